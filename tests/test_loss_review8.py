"""Review round 8, loss journey: the training loss and its gradient are exact.

Our training step (manifest -> ConversationDataset -> collate -> MusicFlamingoLit.training_step) against the
reference `transformers` model with the same weights, in float32, and batching choices against each other: a
padded batch, a packed row, one conversation at a time, accumulated micro-batches. The contract: a step's loss and
gradient are the mean over all its label tokens, whichever way its conversations were batched.
"""

from __future__ import annotations

import json
from functools import partial

import hydra
import lightning as L
import pytest
import torch
from omegaconf import open_dict
from tiny_assets import TINY_IDS, make_tone, write_audio
from train_fixtures import compose_train, write_dataset, write_processor

from musicflamingo.chat import ASSISTANT_HEADER, IGNORE_INDEX, THINK_SUFFIX
from musicflamingo.data.collate import collate, collate_packed
from musicflamingo.data.dataset import ConversationDataset
from musicflamingo.data.manifest import read_manifest
from musicflamingo.processor import MusicFlamingoProcessor

# our parameter names; the reference's are "model." + ours (lm_head.weight as is)
GRADS = (
    "lm_head.weight",
    "language_model.embed_tokens.weight",
    "language_model.layers.0.self_attn.q_proj.weight",
    "language_model.layers.1.mlp.down_proj.weight",
    "multi_modal_projector.linear_1.weight",
    "audio_tower.conv1.weight",
)

RECORDS = [
    {  # two audios in one conversation, two assistant turns
        "id": "two_audios",
        "audio": ["low.wav", "high.wav"],
        "conversations": [
            {"role": "user", "content": "<sound>What is this?"},
            {"role": "assistant", "content": "a low hum"},
            {"role": "user", "content": "<sound>And this one?"},
            {"role": "assistant", "content": "a bright tone, higher"},
        ],
    },
    {  # experiment=think_sft's layout: the think suffix, a think block and an answer
        "id": "think",
        "audio": "high.wav",
        "conversations": [
            {"role": "user", "content": f"<sound>Which note?\n{THINK_SUFFIX}"},
            {"role": "assistant", "content": "<think>one bright partial</think><answer>A5</answer>"},
        ],
    },
    {  # text only, its own system turn
        "id": "text",
        "conversations": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello there, friend."},
        ],
    },
]
ANSWERS = {
    "two_audios": ["a low hum", "a bright tone, higher"],
    "think": ["<think>one bright partial</think><answer>A5</answer>"],
    "text": ["Hello there, friend."],
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny random reference model (2 s windows), its folder, our processor for it and the three samples."""
    pytest.importorskip("transformers")
    from reference_model import reference_config
    from transformers import MusicFlamingoForConditionalGeneration

    root = tmp_path_factory.mktemp("loss_ref")
    config = reference_config()
    config.audio_config.max_source_positions = 100  # 2 s windows, as the tiny training tests (CHUNK)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ref = MusicFlamingoForConditionalGeneration(config).eval()
        with torch.no_grad():  # norms at 1 and biases at 0 would leave them untested
            for name, p in ref.named_parameters():
                if name.endswith("bias") or "norm" in name:
                    p.add_(torch.randn_like(p) * 0.1)
    ref.save_pretrained(root / "ref")
    proc_dir = write_processor(root / "proc")
    write_audio(root / "low.wav", make_tone(220.0, 1.5))
    write_audio(root / "high.wav", make_tone(880.0, 2.5))
    manifest = root / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    processor = MusicFlamingoProcessor.from_pretrained(proc_dir)
    dataset = ConversationDataset(read_manifest(manifest), processor)
    samples = [dataset[i] for i in range(len(dataset))]
    return ref, root, manifest, proc_dir, processor, samples


def _lit_from(root, manifest, proc_dir):  # noqa: ANN001, ANN202
    """The LightningModule train.py builds (configs/model/tiny.yaml) around the reference's weights."""
    cfg = compose_train(root, manifest, proc_dir, [f"model.net.init_from={root / 'ref'}"])
    with open_dict(cfg):
        cfg.model.net.overrides = {}  # the reference folder's own config
    return hydra.utils.instantiate(cfg.model).train()


def _step(lit, batch):  # noqa: ANN001, ANN202
    """(loss, label tokens, {name: gradient}) of the forward and backward `training_step` runs on `batch` (its
    labelled-rows path; how a step combines batches is the Lightning tests' below)."""
    lit.model.zero_grad(set_to_none=True)
    out = lit.model(**lit._model_inputs(batch), return_logits=False)
    out.loss.backward()
    tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert out.num_label_tokens == tokens
    loss = out.loss
    params = dict(lit.model.named_parameters())
    # a text-only batch leaves the audio tower without a gradient: zero
    return (
        loss.detach(),
        tokens,
        {n: torch.zeros_like(params[n]) if params[n].grad is None else params[n].grad.clone() for n in GRADS},
    )


def test_labels_are_the_assistant_turns_only(reference):
    """Which tokens carry a label: each assistant turn's content (a think block included) and its <|im_end|>;
    never the system or user turns, the assistant header, the newline after <|im_end|> or an audio token. Every
    labelled position holds its own token (labels are unshifted)."""
    _ref, _root, _manifest, _proc_dir, processor, samples = reference
    audio = {TINY_IDS.audio_token_id, TINY_IDS.audio_bos_token_id, TINY_IDS.audio_eos_token_id}
    header = processor.tokenizer.encode(ASSISTANT_HEADER)
    for s in samples:
        ids, labels = s["input_ids"], s["labels"]
        learned = labels != IGNORE_INDEX
        assert torch.equal(labels[learned], ids[learned])
        assert not any(int(t) in audio for t in ids[learned])
        # the learned runs are exactly the answers, each with its turn's <|im_end|>
        starts = [i for i in range(len(ids)) if learned[i] and (i == 0 or not learned[i - 1])]
        ends = [i + 1 for i in range(len(ids)) if learned[i] and (i + 1 == len(ids) or not learned[i + 1])]
        runs = [processor.decode(ids[a:b].tolist(), False) for a, b in zip(starts, ends)]
        assert runs == [a + "<|im_end|>" for a in ANSWERS[s["id"]]], s["id"]
        # each run follows the assistant header; the newline after <|im_end|> is not learned
        assert all(ids[a - len(header) : a].tolist() == header for a in starts)
        assert all(b < len(ids) and processor.decode(ids[b : b + 1].tolist(), False) == "\n" for b in ends)
    # both audios of the first conversation are spliced as runs of <sound>, one per <|sound_bos|>
    first = samples[0]["input_ids"]
    assert int((first == TINY_IDS.audio_bos_token_id).sum()) == 2
    assert samples[0]["num_audio_tokens"] == int((first == TINY_IDS.audio_token_id).sum()) > 0


def test_training_step_equals_the_reference_and_batching_does_not_matter(reference):
    """Float32: our training step on a padded batch (two audios in one conversation, a think answer, a text-only
    conversation) gives the reference model's loss and gradients with the same labels; a packed row, and one
    conversation at a time combined by label tokens, give the same loss and gradients."""
    ref, root, manifest, proc_dir, processor, samples = reference
    lit = _lit_from(root, manifest, proc_dir)
    pad = processor.pad_token_id
    padded = collate(samples, pad)
    loss, tokens, grads = _step(lit, padded)

    ref.zero_grad(set_to_none=True)
    try:
        ref.train()
        keys = ("input_ids", "attention_mask", "input_features", "input_features_mask", "labels")
        ref_loss = ref(**{k: padded[k] for k in keys}).loss
        ref_loss.backward()
        ref_params = dict(ref.named_parameters())
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6, abs=1e-6)
        for name in GRADS:
            ref_grad = ref_params[name if name == "lm_head.weight" else "model." + name].grad
            torch.testing.assert_close(grads[name], ref_grad, rtol=1e-4, atol=1e-7, msg=name)
    finally:
        ref.zero_grad(set_to_none=True)
        ref.eval()

    packed_loss, _, packed_grads = _step(lit, collate_packed(samples, pad, max_tokens=100_000))
    assert packed_loss.item() == pytest.approx(loss.item(), rel=1e-6)
    # one conversation at a time: weighted by their label tokens, the padded batch's mean
    total, summed = 0, {n: torch.zeros_like(g) for n, g in grads.items()}
    summed_loss = 0.0
    for s in samples:
        one_loss, n, one = _step(lit, collate([s], pad))
        total += n
        summed_loss += one_loss.item() * n
        for name, g in one.items():
            summed[name] += g * n
    assert total == tokens
    assert summed_loss / total == pytest.approx(loss.item(), rel=1e-6)
    for name in GRADS:
        torch.testing.assert_close(packed_grads[name], grads[name], rtol=1e-4, atol=1e-7, msg=name)
        torch.testing.assert_close(summed[name] / total, grads[name], rtol=1e-4, atol=1e-7, msg=name)


# ---------------------------------------------------------------------------------------------- accumulation
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Three tone conversations of 8, 11 and 12 label tokens, and the tiny training config."""
    root = tmp_path_factory.mktemp("loss_tiny")
    proc_dir = write_processor(root / "proc")
    manifest = write_dataset(root / "data", n=3)
    processor = MusicFlamingoProcessor.from_pretrained(proc_dir)
    dataset = ConversationDataset(read_manifest(manifest), processor)
    samples = [dataset[i] for i in range(len(dataset))]
    assert len({int((s["labels"] != IGNORE_INDEX).sum()) for s in samples}) == 3
    cfg = compose_train(root, manifest, proc_dir, ["trainer.max_steps=1"])
    return cfg, processor.pad_token_id, samples


def fit_one_step(cfg, batches, accumulate, plugins=None):  # noqa: ANN001, ANN202
    """One optimizer step (SGD, lr 1, no clipping) of `cfg.model` over `batches` accumulated, Lightning's
    `plugins` if given: (the weights' change, -gradient, by parameter name; the trainer)."""
    torch.manual_seed(0)
    lit = hydra.utils.instantiate(cfg.model)
    lit.optimizer = partial(torch.optim.SGD, lr=1.0)
    before = {n: p.detach().clone() for n, p in lit.model.named_parameters()}
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=None,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        plugins=plugins,
    )
    loader = torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda b: b)
    trainer.fit(lit, loader)
    return {n: before[n] - p.detach() for n, p in lit.model.named_parameters()}, trainer


def _fit_one_step(cfg, batches, accumulate):  # noqa: ANN001, ANN202
    """The weights' change (-gradient: SGD, lr 1, no clipping) of one optimizer step over `batches` accumulated,
    and the logged train/loss."""
    change, trainer = fit_one_step(cfg, batches, accumulate)
    assert trainer.global_step == 1
    return {n: change[n] for n in GRADS}, float(trainer.callback_metrics["train/loss"])


def test_accumulated_micro_batches_step_as_one_batch_of_them_all(tiny):
    """trainer.accumulate_grad_batches=N: the step's gradient and train/loss are the mean over all label tokens of
    its N micro-batches, as one batch holding them all gives (token-budget batches hold very different numbers of
    label tokens), and a micro-batch whose samples were all skipped as bad changes nothing."""
    cfg, pad, samples = tiny
    one, one_loss = _fit_one_step(cfg, [collate(samples, pad)], 1)
    variants = {
        "[a] [b c]": ([collate(samples[:1], pad), collate(samples[1:], pad)], 2),
        "[a] [b] [c]": ([collate([s], pad) for s in samples], 3),
        "[a b c] [skipped]": ([collate(samples, pad), collate([], pad)], 2),
        "packed": ([collate_packed(samples, pad, max_tokens=10_000)], 1),
    }
    for what, (batches, accumulate) in variants.items():
        change, loss = _fit_one_step(cfg, batches, accumulate)
        assert loss == pytest.approx(one_loss, rel=1e-5), what
        for name in GRADS:
            torch.testing.assert_close(change[name], one[name], rtol=1e-4, atol=1e-7, msg=f"{what}: {name}")


def test_val_loss_is_the_mean_over_label_tokens_whatever_the_batching(tiny):
    cfg, pad, samples = tiny
    torch.manual_seed(0)
    lit = hydra.utils.instantiate(cfg.model)

    def val_loss(batches):  # noqa: ANN001, ANN202
        trainer = L.Trainer(
            accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
        )
        loader = torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda b: b)
        return trainer.validate(lit, loader, verbose=False)[0]["val/loss"]

    whole = val_loss([collate(samples, pad)])
    assert val_loss([collate(samples[:1], pad), collate(samples[1:], pad)]) == pytest.approx(whole, rel=1e-6)
    assert val_loss([collate([s], pad) for s in samples]) == pytest.approx(whole, rel=1e-6)
