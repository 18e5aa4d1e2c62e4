"""Review 18, fine-tuning then GRPO: float16 AMP's skipped steps are counted; a tied base's head trains apart from
its embedding (as the reference); a GRPO resume compares a reward's lists and named functions and says which of
its settings it cannot compare; model.reference_dtype null and the dtype it stands for are one setting; the think
tags are seen by the rewards when the tokenizer makes them special tokens."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_grpo import _net
from test_loss_review8 import fit_one_step
from train_fixtures import compose_train, grpo_module, write_dataset, write_processor

from musicflamingo import grpo
from musicflamingo.data.collate import collate
from musicflamingo.data.dataset import ConversationDataset
from musicflamingo.data.manifest import read_manifest
from musicflamingo.lit import CheckpointMismatchError
from musicflamingo.processor import MusicFlamingoProcessor
from musicflamingo.rewards import FormatReward


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):  # noqa: ANN001, ANN201
    """The tiny training config over two tone conversations, and their one batch."""
    root = tmp_path_factory.mktemp("review18")
    proc_dir, manifest = write_processor(root / "proc"), write_dataset(root / "data", n=2)
    processor = MusicFlamingoProcessor.from_pretrained(proc_dir)
    dataset = ConversationDataset(read_manifest(manifest), processor)
    batch = collate([dataset[i] for i in range(len(dataset))], processor.pad_token_id)
    return root, proc_dir, manifest, batch


# ---------------------------------------------------------------------------------------------- float16 AMP
def test_float16_amp_counts_the_steps_its_scaler_skips(tiny):
    """trainer.precision=16-mixed: a step whose float16 gradients overflow is skipped by the GradScaler (the weights
    do not move, the scale halves), and nothing said so: train/nonfinite_steps counts non-finite losses only, the
    loss was finite. It is counted now in train/amp_skipped_steps (saved in checkpoints) and warned of; a step the
    scaler takes counts nothing. (Lightning turns 16-mixed into bf16-mixed on the CPU: the plugin is built here.)"""
    from lightning.pytorch.plugins import MixedPrecision

    root, proc_dir, manifest, batch = tiny
    cfg = compose_train(root, manifest, proc_dir, ["trainer.max_steps=1"])

    def one_step(scale: float):  # noqa: ANN202
        scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        change, trainer = fit_one_step(cfg, [batch], 1, [MixedPrecision("16-mixed", "cpu", scaler)])
        moved = max(float(c.abs().max()) for c in change.values())
        return moved, trainer, scaler

    moved, trainer, _ = one_step(256.0)
    assert moved > 0 and trainer.lightning_module.amp_skipped_steps == 0
    assert "train/amp_skipped_steps" not in trainer.callback_metrics
    moved, trainer, scaler = one_step(2.0**100)  # float16 gradients overflow at this scale
    lit = trainer.lightning_module
    assert moved == 0 and scaler.get_scale() == 2.0**99  # skipped by the scaler
    assert lit.amp_skipped_steps == 1
    assert float(trainer.callback_metrics["train/amp_skipped_steps"]) == 1.0
    checkpoint: dict = {}
    lit.on_save_checkpoint(checkpoint)
    assert checkpoint["amp_skipped_steps"] == 1


# ---------------------------------------------------------------------------------------------- tied heads
def test_a_tied_base_trains_its_head_apart_from_its_embedding(tiny):
    """A base with tie_word_embeddings=true (Qwen2.5-0.5B's config) fully fine-tuned trained lm_head and
    embed_tokens as one tensor, each update both of theirs; the reference never ties (it reads and trains
    lm_head.weight on its own). The head is a copy of its own now, both train (the head in the language model's
    group), the export says tie_word_embeddings=false; a frozen tied pair (LoRA) stays shared."""
    root, proc_dir, manifest, batch = tiny
    tied = "++model.net.overrides.text.tie_word_embeddings=true"
    cfg = compose_train(root, manifest, proc_dir, ["trainer.max_steps=1", tied])
    change, trainer = fit_one_step(cfg, [batch], 1)
    model = trainer.lightning_module.model
    head, embedding = model.lm_head.weight, model.language_model.embed_tokens.weight
    assert head is not embedding and not model.config.text.tie_word_embeddings
    assert not torch.equal(change["lm_head.weight"], change["language_model.embed_tokens.weight"])
    # the embedding rows of tokens not in the batch only decay; the head's rows all get a gradient
    names = {id(p) for g in trainer.lightning_module.param_groups() for p in g["params"]}
    assert id(head) in names and id(embedding) in names
    lora = compose_train(root, manifest, proc_dir, [tied, "model.net.lora.enabled=true"])
    from hydra.utils import instantiate

    frozen = instantiate(lora.model).model
    assert frozen.lm_head.weight is frozen.language_model.embed_tokens.weight


# ---------------------------------------------------------------------------------------------- GRPO resumes
class Listed:
    """A reward of one's own with a list setting, a function and an object."""

    def __init__(self, weight: float = 1.0, words=("a", "b"), norm=str.lower, helper=None) -> None:  # noqa: ANN001
        self.weight, self.words, self.norm = weight, words, norm
        self.helper = helper if helper is not None else object()

    def __call__(self, output, target) -> float:  # noqa: ANN001
        return float(any(w in self.norm(output.answer) for w in self.words))


def _checkpoint(module) -> dict:  # noqa: ANN001
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    return checkpoint


@pytest.fixture(scope="module")
def lora_net():  # noqa: ANN201
    return _net(lora=True)


def test_a_resume_compares_a_rewards_lists_and_functions_and_names_what_it_cannot(lora_net, caplog):
    """Only numbers, strings and booleans of a reward were compared: another list of words (or another function)
    on the resuming command trained another objective silently. Lists and named functions are compared now; an
    attribute that cannot be (an object) is named, in the warning of every resume and in a refusal."""
    checkpoint = _checkpoint(grpo_module(lora_net, rewards={"mine": Listed()}))
    with caplog.at_level(logging.WARNING, logger=grpo.log.name):
        grpo_module(lora_net, rewards={"mine": Listed()}).on_load_checkpoint(checkpoint)
    assert "model.rewards.mine.helper (object)" in caplog.text and "cannot be compared" in caplog.text
    for change, setting in [
        ({"words": ["a", "c"]}, "model.rewards.mine.words=[a,b] there, [a,c] now"),
        ({"norm": str.upper}, "model.rewards.mine.norm=builtins.str.lower there, builtins.str.upper now"),
    ]:
        with pytest.raises(CheckpointMismatchError) as e:
            grpo_module(lora_net, rewards={"mine": Listed(**change)}).on_load_checkpoint(checkpoint)
        assert setting in str(e.value) and "model.rewards.mine.helper (object): not compared" in str(e.value)
    # a checkpoint saved before lists were: its scalar settings alone compared, the same resume goes on
    del checkpoint[grpo.REWARD_SETTINGS_V2]
    del checkpoint["grpo_loss"]["model.rewards"]["mine"]["words"]
    del checkpoint["grpo_loss"]["model.rewards"]["mine"]["norm"]
    grpo_module(lora_net, rewards={"mine": Listed()}).on_load_checkpoint(checkpoint)


def test_a_null_reference_dtype_and_the_dtype_it_stands_for_are_one_setting():
    """model.reference_dtype=null on a float32 model then float32 on resume (or back) was refused ("null there,
    float32 now") though the reference is the same; bfloat16 is still refused."""
    net = _net(lora=False, freeze_projector=False)
    checkpoint = _checkpoint(grpo_module(net))
    grpo_module(net, reference_dtype="float32").on_load_checkpoint(checkpoint)
    assert checkpoint["grpo_reference_dtype"] == "float32"
    with pytest.raises(CheckpointMismatchError, match=r"model.reference_dtype=null there, bfloat16 now"):
        grpo_module(net, reference_dtype="bfloat16").on_load_checkpoint(checkpoint)
    explicit = _checkpoint(grpo_module(net, reference_dtype="float32"))
    grpo_module(net).on_load_checkpoint(explicit)
    del checkpoint["grpo_reference_dtype"]  # saved before the effective dtype was: null stood for the model's
    grpo_module(net, reference_dtype="float32").on_load_checkpoint(checkpoint)


# ---------------------------------------------------------------------------------------------- special tags
def _tokenizer_with_special_tags(tmp_path: Path):  # noqa: ANN202
    """The tiny tokenizer with <think>, </think>, <answer>, </answer> added as special tokens (as a think-SFT recipe
    adds them)."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as Tokenizers

    from musicflamingo.tokenizer import HFTokenizer

    tok = Tokenizers.from_file(str(write_processor(tmp_path / "proc") / "tokenizer.json"))
    tags = ["<think>", "</think>", "<answer>", "</answer>"]
    tok.add_special_tokens([AddedToken(t, special=True) for t in tags])
    ours = HFTokenizer(tok)
    assert set(tags) <= set(ours.special_tokens)
    return ours


@pytest.mark.parametrize("stop_strings", [None, ["</answer>"]])
def test_think_tags_that_are_special_tokens_reach_the_format_reward(lora_net, tmp_path, stop_strings):
    """Completions were decoded skipping special tokens: where the tokenizer makes the think tags special tokens
    the format reward saw "reasoning" + "a low hum" without a tag (0 for a perfect completion) and the answer
    parser no answer. The tags are decoded as text now, with or without a `</answer>` stop string."""
    from musicflamingo.grpo import Prompt
    from musicflamingo.rewards import AccuracyReward, Target

    tok = _tokenizer_with_special_tags(tmp_path)
    lit = grpo_module(lora_net, rewards={"format": FormatReward(), "accuracy": AccuracyReward()})
    lit._processor = lambda: SimpleNamespace(tokenizer=tok)
    lit.model.generation_defaults = {"stop_strings": stop_strings} if stop_strings else {}
    good = tok.encode("<think>a low tone</think><answer>a low hum</answer>")
    assert len(good) < len(
        tok.encode("<think>a low tone</think><answer>a low hum</answer>".replace("<", "( "))
    )
    end = [tok.token_to_id("<|im_end|>")]
    bad = tok.encode("a low hum")
    prompt = Prompt("c0", [1], Target.from_record({}, "a low hum"), slice(0, 0), "data/train.jsonl:1")
    roll = lit.score([prompt], [[good + end, bad + end]])
    assert roll.components["format"] == [1.0, 0.0]
    assert roll.components["accuracy"][0] == 1.0
    assert roll.outputs[0][0].answer == "a low hum"
    # a tokenizer without the special tags is used as it is
    plain = MusicFlamingoProcessor.from_pretrained(tmp_path / "proc").tokenizer
    assert grpo.TagsKept.wrap(plain) is plain


def test_tags_kept_decodes_as_the_tokenizer_elsewhere(tmp_path):
    tok = _tokenizer_with_special_tags(tmp_path)
    kept = grpo.TagsKept.wrap(tok)
    ids = tok.encode("<think>x y</think><answer>z</answer>") + [tok.token_to_id("<|im_end|>")]
    assert kept.decode(ids) == "<think>x y</think><answer>z</answer>"
    assert tok.decode(ids) == "x yz"
    text = tok.encode("a low hum")
    assert kept.decode(text) == tok.decode(text) and kept.decode([]) == ""
    assert partial(kept.decode, skip_special_tokens=False)(ids).endswith("</answer><|im_end|>")


def test_a_special_answer_close_as_a_stop_id_is_a_complete_answer(lora_net, tmp_path):
    """`</answer>` among the stop ids (a generation_config.json eos list): the completion ends on it, the rollout
    left it out of the text and the parse called the answer broken (format reward 0 for a perfect completion).
    GRPO reads the answer as inference does (engine.AnswerText): the tag is the stop, the answer complete."""
    from musicflamingo.grpo import Prompt
    from musicflamingo.rewards import AccuracyReward, Target

    tok = _tokenizer_with_special_tags(tmp_path)
    lit = grpo_module(lora_net, rewards={"format": FormatReward(), "accuracy": AccuracyReward()})
    lit._processor = lambda: SimpleNamespace(tokenizer=tok)
    lit.model.generation_defaults = {}
    close, end = tok.token_to_id("</answer>"), tok.token_to_id("<|im_end|>")
    lit._stop_ids = lambda: [close, end]
    good = tok.encode("<think>a low tone</think><answer>a low hum</answer>")
    assert good[-1] == close
    prompt = Prompt("c0", [1], Target.from_record({}, "a low hum"), slice(0, 0), "data/train.jsonl:1")
    roll = lit.score([prompt], [[good, good[:-1] + [end]]])
    assert roll.components["format"][0] == 1.0
    assert roll.components["accuracy"][0] == 1.0 and roll.outputs[0][0].answer == "a low hum"
    assert roll.truncated == 0
