"""GRPO (musicflamingo/grpo.py): the loss against a hand computation, advantages, the KL reference (a frozen copy, or
the LoRA model with its adapters off), completion masks, prompts as inference renders them, config errors, and
short runs: a few steps on a tiny synthetic corpus, exact resume, two DDP processes."""

from __future__ import annotations

import csv
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from tiny_assets import make_tone
from torch import nn
from train_fixtures import CONFIGS, TINY_OVERRIDES, compose_train, grpo_module, write_dataset, write_processor

from musicflamingo.chat import conversation, think_prompt
from musicflamingo.data.manifest import read_manifest
from musicflamingo.grpo import (
    GRPOConfigError,
    Prompt,
    adapters_disabled,
    build_sequences,
    frozen_copy,
    group_advantages,
    grpo_loss,
    sound_runs,
    token_terms,
    windows_per_sample,
)
from musicflamingo.model.build import add_lora, build_model, create_model
from musicflamingo.processor import MusicFlamingoProcessor
from musicflamingo.rewards import Target
from musicflamingo.training import train

ROOT = Path(__file__).resolve().parents[1]
AUDIO = {"audio": {"max_source_positions": 100}}
NO_LORA = {"enabled": False, "rank": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj"]}


class PrefersShort:
    """A test reward that varies between samples of a random model: shorter texts score more."""

    def __init__(self, weight: float = 1.0) -> None:
        self.weight = weight

    def __call__(self, output, target) -> float:
        return 1.0 / (1.0 + len(output.text))


class NaNFirstOnRankOne(PrefersShort):
    """PrefersShort, but NaN for the first rollouts scored on DDP rank 1 (the first step's): that rank's loss is
    non-finite while rank 0's is not."""

    calls = 0

    def __call__(self, output, target) -> float:
        NaNFirstOnRankOne.calls += 1
        if os.environ.get("LOCAL_RANK") == "1" and NaNFirstOnRankOne.calls <= 2:
            return float("nan")
        return super().__call__(output, target)


SHORT = "+model.rewards.short={_target_:test_grpo.PrefersShort,weight:1.0}"


# ------------------------------------------------------------------------------------------------ the math
def test_loss_on_a_fixed_batch_equals_the_hand_computation():
    # two completions: 2 tokens and 1 token (padding holds garbage that must not count)
    logp = torch.tensor([[-1.0, -2.0, 5.0], [-0.5, 7.0, 7.0]])
    old = torch.tensor([[-1.2, -2.0, 3.0], [-0.5, 1.0, 1.0]])
    ref = torch.tensor([[-1.0, -1.5, 9.0], [-1.0, 2.0, 2.0]])
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss, stats = grpo_loss(logp, old, ref, adv, mask, clip_eps=0.2, beta=0.1)
    # token 1: ratio e^0.2 = 1.2214 > 1.2 with A = 1 -> clipped, -1.2; KL 0 (ref == logp)
    # token 2: ratio 1, A = 1 -> -1; KL = e^0.5 - 0.5 - 1
    # token 3: ratio 1, A = -2 -> +2; KL = e^-0.5 + 0.5 - 1
    kl2, kl3 = math.exp(0.5) - 1.5, math.exp(-0.5) - 0.5
    expected = (-1.2 + (-1.0 + 0.1 * kl2) + (2.0 + 0.1 * kl3)) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["kl"] == pytest.approx((0 + kl2 + kl3) / 3, abs=1e-6)
    assert stats["clip_fraction"] == pytest.approx(1 / 3)
    # a ratio below 1 - eps with A < 0 is clipped too; with A > 0 it is not (the unclipped side is smaller)
    _, _, clipped = token_terms(
        torch.tensor([-2.0, -2.0]), torch.tensor([-1.0, -1.0]), None, torch.tensor([-1.0, 1.0]), 0.2, 0.0
    )
    assert clipped.tolist() == [True, False]


def test_advantages_are_zero_when_a_group_agrees():
    rewards = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    adv, zero = group_advantages(rewards)
    assert zero.tolist() == [True, False, True]
    assert torch.equal(adv[0], torch.zeros(5)) and torch.equal(adv[2], torch.zeros(5))
    std = math.sqrt((4 * 0.2**2 + 0.8**2) / 4)  # sample standard deviation of [0, 1, 0, 0, 0]
    assert adv[1, 1].item() == pytest.approx(0.8 / (std + 1e-4), rel=1e-6)
    assert adv[1, 0].item() == pytest.approx(-0.2 / (std + 1e-4), rel=1e-6)
    assert adv[1].sum().item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_advantages(torch.ones(3, 1))


def test_completion_masks_exclude_prompt_and_padding():
    ids, attention, completion, plen = build_sequences(
        [[1, 2, 3], [4]], [[7, 8], [9], [5, 6, 7, 8]], [0, 0, 1], pad_id=0
    )
    assert ids.tolist() == [[1, 2, 3, 7, 8], [1, 2, 3, 9, 0], [4, 5, 6, 7, 8]]
    assert attention.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert completion.int().tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 1, 0], [0, 1, 1, 1, 1]]
    assert plen.tolist() == [3, 3, 1]


def test_sound_runs_and_windows_per_sample(tmp_path):
    ids = torch.tensor([9, 300, 300, 300, 9, 300, 300, 9])
    assert sound_runs(ids, 300) == [3, 2] and sound_runs(torch.tensor([1, 2]), 300) == []
    processor = MusicFlamingoProcessor.from_pretrained(write_processor(tmp_path / "proc"))
    waves = [make_tone(440.0, 1.5), make_tone(220.0, 3.0)]  # 2 s windows: 1 window, then 2
    windows = [w for x in waves for w in processor.split_windows(x)]
    _, mask = processor.extract_features(windows)
    tokens = [processor.audio_token_count(len(x)) for x in waves]
    assert windows_per_sample(mask, tokens) == [slice(0, 1), slice(1, 3)]
    assert windows_per_sample(None, [0, 0]) == [slice(0, 0), slice(0, 0)]
    with pytest.raises(RuntimeError, match="do not add up"):
        windows_per_sample(mask, [tokens[0] + 1, tokens[1]])


# ------------------------------------------------------------------------------------------------ the module
def _net(lora: bool, freeze_projector: bool = True, overrides=AUDIO, lora_dropout: float = 0.0):
    return build_model(
        preset="tiny",
        overrides=overrides,
        init_from=None,
        seed=0,
        rote_quirk=True,
        gradient_checkpointing=False,
        compile=False,
        freeze={"audio_tower": True, "multi_modal_projector": freeze_projector, "language_model": lora},
        lora={**NO_LORA, "enabled": lora, "dropout": lora_dropout},
    )


def _fake_rollouts():
    """Two text-only prompts with two completions each (ids of the tiny vocabulary)."""
    g = torch.Generator().manual_seed(0)
    target = Target("qa", "qa", "x")
    prompts = [
        Prompt(f"p{i}", torch.randint(0, 290, (5 + i,), generator=g).tolist(), target, slice(0, 0))
        for i in range(2)
    ]
    completions = [torch.randint(0, 290, (n,), generator=g).tolist() for n in (3, 1, 4, 2)]
    return prompts, completions, [0, 0, 1, 1]


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_kl_is_zero_at_step_zero(lora):
    lit = grpo_module(_net(lora), beta=0.04)
    assert (lit.reference is None) == lora  # LoRA: no second copy
    lit.model.train()
    prompts, completions, owner = _fake_rollouts()
    logp, which = lit.sequence_logprobs(lit.model, prompts, completions, owner, None, None)
    ref = lit._reference_logprobs(prompts, completions, owner, None, None)
    assert logp.shape == ref.shape == (3 + 1 + 4 + 2,) and which.tolist() == [0] * 3 + [1] + [2] * 4 + [3] * 2
    assert logp.requires_grad and not ref.requires_grad
    _, kl, _ = token_terms(logp, logp.detach(), ref, torch.ones_like(logp), 0.2, 0.04)
    assert kl.abs().max().item() == 0.0


def test_reference_copy_follows_the_policys_precision():
    """bf16-true casts the policy before fit start, but not the reference copy (kept out of the module tree): with
    `reference_dtype` null the copy takes the policy's dtype then (a float32 copy beside a bfloat16 policy took twice
    the memory, and its KL at step zero was not zero); a set `reference_dtype` stays."""
    lit = grpo_module(_net(False), beta=0.04)
    assert lit.reference.dtype == torch.float32
    lit.model.to(torch.bfloat16)  # what bf16-true's precision plugin does before on_fit_start
    lit.on_fit_start()
    assert lit.reference.dtype == torch.bfloat16
    prompts, completions, owner = _fake_rollouts()
    logp, _ = lit.sequence_logprobs(lit.model, prompts, completions, owner, None, None)
    ref = lit._reference_logprobs(prompts, completions, owner, None, None)
    assert torch.equal(logp.detach(), ref)  # the same numbers: KL exactly zero at step zero

    kept = grpo_module(_net(False), beta=0.04, reference_dtype="float32")
    kept.model.to(torch.bfloat16)
    kept.on_fit_start()
    assert kept.reference.dtype == torch.float32


def test_frozen_copy_is_made_in_its_dtype_without_a_float32_second_copy(monkeypatch):
    """The reference copy's parameters are made in `reference_dtype` directly: equal to the policy's cast, frozen,
    not shared with the policy, tied weights still tied; and no parameter is first copied at float32 (the release's
    33 GB second copy before the cast)."""
    net = _net(False)
    deep_copied: list[torch.dtype] = []  # parameters copied as they are (float32), before any cast
    deepcopy = nn.Parameter.__deepcopy__

    def recording_deepcopy(self, memo):
        deep_copied.append(self.dtype)
        return deepcopy(self, memo)

    monkeypatch.setattr(nn.Parameter, "__deepcopy__", recording_deepcopy)
    ref = frozen_copy(net, torch.bfloat16)
    monkeypatch.undo()
    assert deep_copied == []
    assert not ref.training and ref.dtype == torch.bfloat16
    for (name, p), (rname, r) in zip(net.named_parameters(), ref.named_parameters(), strict=True):
        assert name == rname and not r.requires_grad and r.data_ptr() != p.data_ptr()
        assert torch.equal(r, p.detach().to(torch.bfloat16)), name
    with torch.no_grad():
        next(net.parameters()).add_(1.0)  # the policy moves, the reference does not
    assert not torch.equal(next(ref.parameters()), next(net.parameters()).to(torch.bfloat16))
    # the rotary tables stay float32 (recomputed after the cast)
    assert ref.language_model.rotary_emb.inv_freq.dtype == torch.float32
    same = frozen_copy(net)
    assert same.dtype == torch.float32 and all(
        torch.equal(a, b) for a, b in zip(net.parameters(), same.parameters(), strict=True)
    )


def test_lora_reference_is_the_base_model():
    base = create_model("tiny", AUDIO, seed=0).eval()
    net = _net(lora=True)
    for name, p in net.named_parameters():  # trained adapters: the policy is no longer the base model
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    net.eval()
    ids = torch.randint(0, 290, (2, 9))
    with torch.no_grad():
        with adapters_disabled(net):
            ref = net(ids).logits
        policy = net(ids).logits
        expected = base(ids).logits
    assert torch.equal(ref, expected)
    assert not torch.allclose(policy, expected, atol=1e-3)
    # and the GRPO reference log-probs are the base model's
    lit = grpo_module(net)
    prompts, completions, owner = _fake_rollouts()
    with torch.no_grad():
        base_logp = lit.sequence_logprobs(base, prompts, completions, owner, None, None)[0]
    assert torch.equal(lit._reference_logprobs(prompts, completions, owner, None, None), base_logp)


def test_qlora_reference_is_the_quantized_base_with_adapters_off():
    """QLoRA (`model.net.quantize_base`) is LoRA for the KL reference: no frozen copy (one rebuilt the 4-bit base's
    parameters as plain tensors, without bitsandbytes' quantization state, and its forward crashed) and its
    adapters, `QuantizedLoRALinear`s, switched off by `adapters_disabled`. bitsandbytes needs CUDA here, so the
    stand-in 4-bit class of the planner's QLoRA tests plays the base."""
    sys.path.insert(0, str(ROOT / "bench"))
    from cases import Int8StandIn  # bench/cases.py: the CPU stand-in for bitsandbytes' NF4 Linear4bit

    net = create_model("tiny", AUDIO, seed=0)
    net.audio_tower.requires_grad_(False)
    net.multi_modal_projector.requires_grad_(False)
    add_lora(net, {**NO_LORA, "enabled": True}, Int8StandIn)
    net.eval()
    ids = torch.randint(0, 290, (2, 9))
    with torch.no_grad():
        base = net(ids).logits  # B = 0: the quantized base model
        for name, p in net.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.5)
        policy = net(ids).logits
        with adapters_disabled(net):
            ref = net(ids).logits
    assert not torch.allclose(policy, base, atol=1e-3)
    assert torch.equal(ref, base)
    lit = grpo_module(net, beta=0.04)
    assert lit.uses_lora and lit.reference is None
    prompts, completions, owner = _fake_rollouts()
    with torch.no_grad(), adapters_disabled(net):
        base_logp = lit.sequence_logprobs(net, prompts, completions, owner, None, None)[0]
    assert torch.equal(lit._reference_logprobs(prompts, completions, owner, None, None), base_logp)


def test_config_errors_name_the_setting():
    with pytest.raises(GRPOConfigError, match="multi_modal_projector"):
        grpo_module(_net(lora=True, freeze_projector=False))  # the adapters-off reference would move
    grpo_module(_net(lora=True, freeze_projector=False), beta=0.0)  # no reference: allowed
    with pytest.raises(GRPOConfigError, match=r"model.rollout: unknown key\(s\) \['groups'\]"):
        grpo_module(_net(lora=True), rollout={"groups": 5})
    with pytest.raises(GRPOConfigError, match="model.rollout.group_size=1"):
        grpo_module(
            _net(lora=True),
            rollout={
                "group_size": 1,
                "max_new_tokens": 4,
                "temperature": 1.0,
                "top_p": 1.0,
                "top_k": 0,
                "slots": None,
            },
        )
    with pytest.raises(GRPOConfigError, match="model.rewards.bad"):
        grpo_module(_net(lora=True), rewards={"bad": object()})


def test_dropout_is_refused_with_the_settings_to_change():
    """The ratio and the KL compare passes made at different times (rollout, before and during the updates): with
    dropout they differ by its noise alone, so a model with any dropout is refused, naming each setting."""
    overrides = {"audio": {**AUDIO["audio"], "activation_dropout": 0.1}, "text": {"attention_dropout": 0.2}}
    dropped = _net(lora=True, overrides=overrides, lora_dropout=0.05)
    with pytest.raises(GRPOConfigError) as e:
        grpo_module(dropped)
    for setting in ("audio.activation_dropout=0.1", "text.attention_dropout=0.2", "lora.dropout=0.05"):
        assert setting in str(e.value)
    assert "audio.dropout=" not in str(e.value)  # a setting at 0 is not named
    grpo_module(_net(lora=True))  # no dropout: accepted


def test_a_task_filter_that_keeps_no_record_is_an_error(tmp_path):
    """model.tasks matching no record of the training data (captions asked, questions given) stops at fit start
    naming the tasks there are; it used to train every step on nothing."""
    proc = write_processor(tmp_path / "proc")
    manifest = write_dataset(tmp_path / "data")
    overrides = [
        "experiment=grpo",
        SHORT,
        "model.rollout.max_new_tokens=3",
        "model.tasks=[caption]",
        "export=false",
    ]
    with pytest.raises(GRPOConfigError, match=r"model.tasks=\['caption'\] keeps no record .*their tasks: qa"):
        train(compose_train(tmp_path, manifest, proc, overrides))


def test_prompts_are_rendered_as_inference_renders_them(tmp_path, monkeypatch):
    proc_dir = write_processor(tmp_path / "proc")
    processor = MusicFlamingoProcessor.from_pretrained(proc_dir)
    manifest = write_dataset(tmp_path / "data", n=1)
    record = read_manifest(manifest)[0]
    for think in (True, False):
        rewards = {"short": PrefersShort()}  # the format reward needs think mode
        lit = grpo_module(_net(lora=True), think=think, rewards=rewards)
        monkeypatch.setattr(lit, "_processor", lambda: processor)
        text = think_prompt("What is this?") if think else "What is this?"
        expected = processor.apply_chat_template([conversation(text, record.audios[0].path)])["input_ids"][0]
        assert lit.prompt_ids(record, sound_runs(expected, 300)) == expected.tolist()


# ------------------------------------------------------------------------------------------------ runs
def _metrics(run: Path) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if v} for r in csv.DictReader(open(run / "csv" / "metrics.csv"))]


def test_grpo_on_a_tiny_synthetic_corpus_runs_logs_and_checkpoints(tmp_path):
    """experiment=grpo_synthetic for two steps: the small model (random) on a 2-clip corpus with its SentencePiece
    processor, as musicflamingo.demo builds them; a test reward that varies gives the steps a gradient."""
    if shutil.which("fluidsynth") is None:
        pytest.skip("needs Debian's fluidsynth (make setup)")
    from musicflamingo.data.synthetic import build_corpus
    from musicflamingo.demo import build_processor, model_overrides
    from musicflamingo.model import MusicFlamingoConfig

    corpus = build_corpus(
        tmp_path / "synthetic", n_train=2, n_val=1, n_test=1, clip_seconds=(4, 5), progress=False
    )
    window = MusicFlamingoConfig.from_name("small").window_seconds
    proc = build_processor(corpus, tmp_path / "synthetic" / "processor", 400, window)
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[
                "experiment=grpo_synthetic",
                "debug=fast",
                f"paths.data_dir={tmp_path}",
                f"paths.output_dir={tmp_path / 'run'}",
                f"data.processor={proc}",  # a real run reads it from model.net.init_from (the demo's export)
                "data.num_workers=0",
                "data.batch_max_tokens=700",  # ~3 of the 8 questions per step
                f"data.val={tmp_path / 'synthetic' / 'val.jsonl'}",  # greedy rewards on the val split, every step
                "trainer.limit_val_batches=1",
                "trainer.val_check_interval=1",
                "model.rollout.max_new_tokens=6",
                "logger=csv",
                SHORT,
            ],
        )
    with open_dict(cfg):
        cfg.model.net.overrides = model_overrides(MusicFlamingoProcessor.from_pretrained(proc))
    metrics, obj = train(cfg)
    assert obj["trainer"].global_step == 2
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    rows = [r for r in _metrics(tmp_path / "run") if "train/reward" in r]
    assert len(rows) == 2
    for key in (
        "train/loss",
        "train/reward/accuracy",
        "train/reward/short",
        "train/reward_std",
        "train/kl",
        "train/clip_fraction",
        "train/completion_length",
        "train/zero_variance_groups",
        "train/samples_per_s",
        "train/grad_norm",
    ):
        assert all(key in r for r in rows), key
    assert "train/reward/format" not in rows[0]  # dropped by grpo_synthetic (answer-only)
    val = [r for r in _metrics(tmp_path / "run") if "val/reward" in r]
    assert val and "val/reward/accuracy" in val[0] and "val/reward/short" in val[0]
    assert float(rows[0]["train/kl"]) == pytest.approx(0.0, abs=1e-3)  # bf16 autocast: equal up to rounding
    assert 1 <= float(rows[0]["train/completion_length"]) <= 6
    lit = obj["model"]
    assert lit.reference is not None and not any(p.requires_grad for p in lit.reference.parameters())


def test_grpo_raises_a_learnable_reward(tmp_path):
    """The sign of the whole pipeline: with a reward for short answers, 30 steps of full fine-tuning (against the
    frozen copy) take the tiny random model from ~0.15 to answering with <|im_end|> at once."""
    proc = write_processor(tmp_path / "proc")
    manifest = write_dataset(tmp_path / "data")
    overrides = [
        "experiment=grpo",
        SHORT,
        "model.rewards.format=null",
        "model.net.lora.enabled=false",
        "model.net.freeze.language_model=false",
        "model.optimizer.lr=1e-2",
        "model.rollout.max_new_tokens=6",
        "trainer.max_steps=30",
        "trainer.log_every_n_steps=1",
        "export=false",
    ]
    train(compose_train(tmp_path, manifest, proc, overrides))
    rows = [r for r in _metrics(tmp_path / "run") if "train/reward" in r]
    reward = [float(r["train/reward"]) for r in rows]
    length = [float(r["train/completion_length"]) for r in rows]
    assert len(rows) == 30
    assert sum(reward[:5]) / 5 < 0.3 and sum(reward[-5:]) / 5 > 0.6, reward
    assert sum(length[-5:]) / 5 < 3 < sum(length[:5]) / 5, length


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_grpo_resume_is_exact(tmp_path):
    proc = write_processor(tmp_path / "proc")
    manifest = write_dataset(tmp_path / "data")
    common = [
        "experiment=grpo",
        SHORT,
        "model.rollout.max_new_tokens=5",
        "model.optimizer.lr=1e-2",
        "trainer.log_every_n_steps=1",
        "export=false",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "data.batch_max_tokens=800",
    ]
    _, a = train(compose_train(tmp_path / "a", manifest, proc, common + ["trainer.max_steps=4"]))
    train(compose_train(tmp_path / "b", manifest, proc, common + ["trainer.max_steps=2"]))
    _, b = train(compose_train(tmp_path / "b", manifest, proc, common + ["trainer.max_steps=4"]))
    assert b["trainer"].global_step == 4
    wa, wb = _weights(a["model"].model), _weights(b["model"].model)
    assert any("lora_B" in k and wa[k].abs().sum() > 0 for k in wa)  # the adapters did train
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6, rtol=0), k
    ra = [r for r in _metrics(tmp_path / "a" / "run") if "train/reward" in r]
    rb = [r for r in _metrics(tmp_path / "b" / "run") if "train/reward" in r]
    # metrics.csv continues across the resume (steps 0-1 of the first run of b, 2-3 of the second): the same
    # rollouts before and after it
    assert [r["step"] for r in rb] == [r["step"] for r in ra] == ["0", "1", "2", "3"]
    assert [r["train/reward"] for r in ra] == [r["train/reward"] for r in rb]


def test_schedule_by_epochs_counts_every_update(tmp_path):
    """updates_per_batch=2 steps the optimizer and schedule twice a batch: a cosine sized by the epochs lasts the
    whole run (it was sized in batches and spent half the run at its minimum)."""
    proc = write_processor(tmp_path / "proc")
    manifest = write_dataset(tmp_path / "data", n=8)
    overrides = [
        "experiment=grpo",
        SHORT,
        "model.rollout.max_new_tokens=3",
        "trainer.max_steps=-1",
        "trainer.max_epochs=1",
        "model.scheduler.max_steps=-1",
        "model.scheduler.warmup_steps=0",
        "model.scheduler.min_lr_ratio=0.0",
        "model.loss.updates_per_batch=2",
        "data.batch_max_tokens=500",
        "export=false",
    ]
    _, objects = train(compose_train(tmp_path, manifest, proc, overrides))
    trainer = objects["trainer"]
    batches = trainer.num_training_batches
    assert batches >= 4 and trainer.global_step == 2 * batches
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == 2 * batches
    # halfway through the run the cosine is halfway down (sized in batches it was already at its floor there)
    assert scheduler.lr_lambdas[0](batches) == pytest.approx(0.5, abs=0.05)
    assert scheduler.lr_lambdas[0](2 * batches - 1) > 0


def test_grpo_ddp_two_cpu_processes(tmp_path):
    """Two CPU processes (gloo), each rank its own prompts, micro-batches of one group: the ranks stay in step.
    With a non-finite loss on rank 1 only at the first step (model.nonfinite_loss=skip) both ranks skip that step
    together and go on (rank 1 used to skip alone and rank 0 waited in the gradient all-reduce: a hang); the
    second step, finite on both ranks, is not skipped and trains. (One launch: a run with finite steps only was a
    second launch of the same two processes.)"""
    reward = "NaNFirstOnRankOne"
    proc = write_processor(tmp_path / "proc")
    manifest = write_dataset(tmp_path / "data", n=3)
    run = tmp_path / "ddp_run"
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "experiment=grpo",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "debug=fast",
        f"+model.rewards.short={{_target_:test_grpo.{reward},weight:1.0}}",
        "model.nonfinite_loss=skip",
        "model.rollout.max_new_tokens=4",
        "model.loss.micro_batch_size=2",
        f"data.train={manifest}",
        f"data.processor={proc}",
        "data.batch_max_tokens=4096",
        f"+model.net.overrides={TINY_OVERRIDES}",
        f"hydra.run.dir={run}",
        f"paths.log_dir={tmp_path / 'logs'}",
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",  # two ranks of two spinning OpenMP threads each on a 2-core machine stall each other
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    logs = out.stdout + out.stderr + "".join(p.read_text() for p in run.glob("*.log"))
    # both ranks skip the first step: rank 1 for its NaN, rank 0 for the other rank's
    assert "non-finite GRPO loss on another rank" in logs and "non-finite GRPO loss nan" in logs, logs[-3000:]
    skips = [line for line in logs.splitlines() if "non-finite GRPO loss" in line]
    assert all("at global step 0," in line and "(1 so far)" in line for line in skips), skips  # step 2 finite
    assert (run / "checkpoints" / "last.ckpt").is_file()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    # the skipped step left the adapters at zero: only the finite second step can have trained lora_B
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in ckpt["state_dict"].items())


@pytest.mark.gpu
def test_release_size_lora_step_on_gpu(tmp_path, monkeypatch):
    """One GRPO step of the release-size model (random weights, bf16, LoRA, gradient checkpointing) on one GPU:
    prints the peak memory and the seconds per step (docs/reasoning.md). `pytest -m gpu tests/test_grpo.py -s`"""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    import time

    import lightning as L

    proc = write_processor(tmp_path / "proc", chunk_length=30.0)  # the release's 30 s windows
    manifest = write_dataset(tmp_path / "data", n=8)
    ids = "{audio_token_id:300,audio_bos_token_id:301,audio_eos_token_id:302,text:{eos_token_id:299,pad_token_id:297}}"
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[
                "experiment=grpo",
                "model=music_flamingo_2601",
                "model.net.preset=music_flamingo_2601",
                f"+model.net.overrides={ids}",  # the tests' tokenizer ids (the weights are random anyway)
                "trainer=gpu",
                "trainer.precision=bf16-true",
                "trainer.max_steps=2",
                "trainer.log_every_n_steps=1",
                "trainer.enable_progress_bar=false",
                SHORT,
                "model.rollout.max_new_tokens=256",
                "model.loss.micro_batch_size=10",
                f"data.train={manifest}",
                f"data.processor={proc}",
                "data.batch_max_tokens=100000",  # the 8 prompts in one batch: 40 completions
                "export=false",
                "logger=csv",
                f"paths.output_dir={tmp_path / 'run'}",
                f"paths.log_dir={tmp_path / 'logs'}",
            ],
        )

    class Clock(L.Callback):
        def __init__(self) -> None:
            self.seconds: list[float] = []

        def on_train_batch_start(self, *args) -> None:
            torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, *args) -> None:
            torch.cuda.synchronize()
            self.seconds.append(time.perf_counter() - self.t0)

    clock = Clock()
    import musicflamingo.training as training

    build = training.build_trainer

    def with_clock(c, extra_callbacks=()):
        trainer = build(c, extra_callbacks=extra_callbacks)
        trainer.callbacks.append(clock)
        return trainer

    monkeypatch.setattr(training, "build_trainer", with_clock)
    torch.cuda.reset_peak_memory_stats()
    _, obj = train(cfg)
    assert obj["trainer"].global_step == 2
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"\nrelease-size GRPO step, LoRA, bf16: {clock.seconds} s per step, peak {peak:.1f} GiB")


# ------------------------------------------------------------------------------------------------ checked at start
def _attach_manifests(lit, *manifests: Path):  # noqa: ANN001
    """A stand-in trainer whose data module holds `manifests` as its training datasets (one each)."""
    from types import SimpleNamespace

    datasets = [SimpleNamespace(records=read_manifest(m)) for m in manifests]
    dm = SimpleNamespace(train_dataset=SimpleNamespace(datasets=datasets), val_dataset=None)
    lit._trainer = SimpleNamespace(datamodule=dm)
    return lit


def _rewrite(manifest: Path, change) -> Path:  # noqa: ANN001
    import json

    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    for i, r in enumerate(records):
        change(i, r)
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    return manifest


def test_records_sharing_an_id_each_get_their_own_prompt_and_answer(tmp_path):
    """A batch names its records by `file:line`, so ids may repeat: two manifests of the same file name without ids
    (default ids `train.jsonl:<line>` collide) and 1 / "1" in one manifest. GRPO used to key records by id (refused
    such data, and before that gave the second record the first one's prompt and answer, silently)."""
    from musicflamingo.data.collate import collate
    from musicflamingo.data.dataset import ConversationDataset

    processor = MusicFlamingoProcessor.from_pretrained(write_processor(tmp_path / "proc"))
    x = _rewrite(write_dataset(tmp_path / "x"), lambda i, r: r.pop("id"))
    y = _rewrite(  # same file name, other answers
        write_dataset(tmp_path / "y"),
        lambda i, r: (r.pop("id"), r["conversations"][1].update(content=f"answer of y{i}")),
    )
    dup = _rewrite(write_dataset(tmp_path / "d"), lambda i, r: r.update(id=1 if i == 0 else "1"))
    lit = _attach_manifests(grpo_module(_net(lora=True)), x, y, dup)
    records = [r for m in (x, y, dup) for r in read_manifest(m)]
    assert len({r.id for r in records}) < len(records)  # the ids do collide
    lit._processor = lambda: processor
    batch = collate([ConversationDataset(records, processor)[i] for i in range(len(records))], 297, "left")
    prompts = lit.batch_prompts(batch)
    assert [p.target.answer for p in prompts] == [r.messages[-1].content for r in records]
    assert [p.ids for p in prompts] == [
        lit.prompt_ids(r, sound_runs(torch.tensor(p.ids), 300)) for r, p in zip(records, prompts)
    ]
    # in a run, data whose ids repeat trains (it was refused at fit start)
    overrides = [
        "experiment=grpo",
        SHORT,
        "export=false",
        "trainer.max_steps=2",
        "trainer.log_every_n_steps=1",
    ]
    overrides += ["model.rollout.max_new_tokens=4"]
    train(compose_train(tmp_path, dup, tmp_path / "proc", overrides))
    assert _metrics(tmp_path / "run")  # it trained and logged


@pytest.mark.parametrize(
    "change, error",
    [
        (
            {"task": "mcq", "choices": "AB", "answer": "A"},
            r"train.jsonl:4: 'choices' must be a list of strings",
        ),
        ({"task": "caption", "facts": {}}, r"train.jsonl:4: 'facts' must be a non-empty object"),
        ({"answer": ""}, r"train.jsonl:4: 'answer' is empty"),
        ({"answer": ["a", "b"]}, r"train.jsonl:4: 'answer' must be a string or a number"),
        ({"answer": True}, r"train.jsonl:4: 'answer' must be a string or a number"),
        (
            {"task": "mcq", "choices": ["60 BPM", "90 BPM"], "answer": "120 BPM"},
            r"train.jsonl:4: 'answer' '120 BPM' is none of 'choices'",
        ),
    ],
)
def test_reward_fields_of_every_record_are_checked_at_start(tmp_path, change, error):
    """A bad reward field used to stop the run when its record's batch came (with bad_sample_policy=skip too)."""
    manifest = _rewrite(write_dataset(tmp_path / "data"), lambda i, r: r.update(change) if i == 3 else None)
    lit = _attach_manifests(grpo_module(_net(lora=True)), manifest)
    with pytest.raises(ValueError, match=error):
        lit._record_table("train")


def test_a_caption_without_facts_is_reported_once(tmp_path, caplog):
    from musicflamingo.rewards import CaptionFactsReward

    manifest = _rewrite(write_dataset(tmp_path / "data"), lambda i, r: r.update(task="caption"))
    lit = _attach_manifests(grpo_module(_net(lora=True), rewards={"facts": CaptionFactsReward()}), manifest)
    with caplog.at_level("WARNING", logger="musicflamingo.grpo"):
        lit._record_table("train")
    warned = [r.getMessage() for r in caplog.records if "no 'facts'" in r.getMessage()]
    assert len(warned) == 1 and "4 caption record(s)" in warned[0] and "train.jsonl:1" in warned[0]


def test_the_format_reward_without_think_mode_is_refused():
    """Without think mode no completion has the tags: the format reward was 0 for every sample, silently."""
    with pytest.raises(
        GRPOConfigError, match=r"model.rewards.format .* model.think=false: set model.rewards.format=null"
    ):
        grpo_module(_net(lora=True), think=False)


def test_a_resume_with_another_kl_reference_is_refused():
    """Full fine-tuning's reference is a copy of the weights the run starts from: resuming without the run's
    model.net.init_from rebuilt it from a random init (train/kl 0.2 at once instead of ~0), silently."""
    from musicflamingo.lit import CheckpointMismatchError

    def net(seed: int):  # noqa: ANN202
        m = _net(lora=False)
        torch.manual_seed(seed)
        for p in m.parameters():
            nn.init.normal_(p, std=0.02)
        return m

    saved = grpo_module(net(1))
    checkpoint = {"state_dict": saved.state_dict()}
    saved.on_save_checkpoint(checkpoint)
    assert "grpo_reference" in checkpoint
    grpo_module(net(1)).on_load_checkpoint(checkpoint)  # the same starting weights: accepted
    with pytest.raises(CheckpointMismatchError, match="KL reference .* resume with the model.net.init_from"):
        grpo_module(net(2)).on_load_checkpoint(checkpoint)
    with pytest.raises(CheckpointMismatchError, match=r"model.loss.beta=0.04 there, 0.0 now"):
        grpo_module(net(2), beta=0.0).on_load_checkpoint(checkpoint)
    grpo_module(net(2), beta=0.0, accept_setting_changes=True).on_load_checkpoint(
        checkpoint
    )  # no reference now


@pytest.mark.parametrize(
    "setting, error",
    [
        ("trainer.max_steps=5", r"trainer.max_steps=5 with model.loss.updates_per_batch=2: .* stop at 6"),
        ("callbacks.model_checkpoint.every_n_train_steps=3", r"every_n_train_steps=3 .* every 6 steps"),
    ],
)
def test_updates_per_batch_needs_step_counts_it_can_reach(tmp_path, setting, error):
    """updates_per_batch=2 makes two optimizer steps a batch: max_steps=5 ended at step 6, and a checkpoint every
    3 steps came only at step 6."""
    proc = write_processor(tmp_path / "proc")
    manifest = write_dataset(tmp_path / "data", n=8)
    overrides = [
        "experiment=grpo",
        SHORT,
        "model.rollout.max_new_tokens=3",
        "model.loss.updates_per_batch=2",
        "trainer.max_steps=4",
        "data.batch_max_tokens=800",
        "export=false",
        setting,
    ]
    with pytest.raises(GRPOConfigError, match=error):
        train(compose_train(tmp_path, manifest, proc, overrides))
