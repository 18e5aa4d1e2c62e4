"""GRPO and its distribution, review round 10: rollouts stop on the ids inference stops on (not the tokenizer's eos
where it differs), trainer=fsdp refused at fit start (it hung or crashed), adapters that start trained named as
outside the KL reference, and full fine-tuning's reference sharing the frozen parts instead of copying them."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_grpo import _net
from tiny_checkpoint import write_tiny_checkpoint
from train_fixtures import grpo_module

from musicflamingo.checkpoint import stop_token_ids
from musicflamingo.grpo import GRPOConfigError
from musicflamingo.model import MusicFlamingo
from musicflamingo.processor import MusicFlamingoProcessor

ROOT = Path(__file__).resolve().parents[1]


def _with_tokenizer_eos(ckpt: Path, token: str) -> Path:
    path = ckpt / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["eos_token"] = token
    path.write_text(json.dumps(config))
    return ckpt


def test_rollouts_stop_on_the_ids_inference_stops_on(tmp_path):
    """A checkpoint whose tokenizer's eos is not the model's (a Qwen2 base tokenizer: `<|endoftext|>`, 297 here)
    while config.json and generation_config.json end answers with `<|im_end|>` (299): infer.py and eval.py decode
    on past 297, GRPO's rollouts stopped there, so rewards were computed on answers inference never gives."""
    ckpt = _with_tokenizer_eos(write_tiny_checkpoint(tmp_path / "ckpt"), "<|endoftext|>")
    net = MusicFlamingo.from_pretrained(ckpt)
    processor = MusicFlamingoProcessor.from_pretrained(ckpt)
    assert processor.eos_token_id == 297 != net.config.text.eos_token_id
    lit = grpo_module(net, beta=0.0)
    lit._processor = lambda: processor
    inference = stop_token_ids(ckpt, net.config)
    assert 297 not in inference
    assert sorted(lit._stop_ids()) == inference
    assert lit._stop_ids()[0] == net.config.text.eos_token_id


def test_fsdp_is_refused_at_fit_start():
    """`experiment=grpo trainer=fsdp` (docs/reasoning.md said it worked with LoRA) hung at the first batch on two
    CPU processes without clipping, and with `model.loss.max_grad_norm` stopped there with FSDP's "expected to be
    in states [IDLE] but current state is FORWARD_BACKWARD": refused before the first rollout, naming the setting
    and what works."""
    from musicflamingo.distributed import fsdp_strategy

    module = grpo_module(_net(lora=True))
    module.trainer = SimpleNamespace(strategy=fsdp_strategy(), precision_plugin=None, max_steps=2)
    with pytest.raises(GRPOConfigError, match=r"trainer=fsdp: GRPO does not run under FSDP.*trainer=ddp"):
        module.on_fit_start()


def _lora_net(**lora):  # noqa: ANN003, ANN202
    from test_grpo import AUDIO, NO_LORA

    from musicflamingo.model.build import build_model

    return build_model(
        preset="tiny",
        overrides=AUDIO,
        init_from=None,
        seed=0,
        rote_quirk=True,
        gradient_checkpointing=False,
        compile=False,
        freeze={"audio_tower": True, "multi_modal_projector": True, "language_model": True},
        lora={**NO_LORA, "enabled": True, **lora},
    )


def test_adapters_that_start_trained_are_said_not_to_be_the_kl_reference(tmp_path, caplog):
    """GRPO from the think-SFT run's adapters (`model.net.lora.init_from_peft=<run>/export_adapter`): with LoRA the
    KL reference is the model with its adapters off, so here the model before the SFT, not the one the run starts
    from: the KL at step 0 was not 0 and the penalty pulled the policy back to the pre-SFT model, silently. Said at
    start, with what keeps the starting model as the reference; fresh adapters or beta 0 say nothing."""
    import logging

    import torch
    from test_grpo import _fake_rollouts

    from musicflamingo.grpo import token_terms
    from musicflamingo.model.peft_format import save_peft_adapter

    sft = _lora_net()
    for name, p in sft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    save_peft_adapter(sft, tmp_path / "adapter")
    net = _lora_net(init_from_peft=str(tmp_path / "adapter"))
    with caplog.at_level(logging.WARNING, logger="musicflamingo.grpo"):
        lit = grpo_module(net, beta=0.04)
    said = [r.getMessage() for r in caplog.records if "KL reference" in r.getMessage()]
    assert len(said) == 1 and "model.net.lora.init_from_peft" in said[0] and "model.net.init_from" in said[0]
    prompts, completions, owner = _fake_rollouts()
    logp, _ = lit.sequence_logprobs(lit.model, prompts, completions, owner, None, None)
    ref = lit._reference_logprobs(prompts, completions, owner, None, None)
    _, kl, _ = token_terms(logp, logp.detach(), ref, torch.ones_like(logp), 0.2, 0.04)
    assert kl.abs().max().item() > 0  # what the warning is about
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="musicflamingo.grpo"):
        grpo_module(_lora_net(init_from_peft=str(tmp_path / "adapter")), beta=0.0)
        grpo_module(_lora_net(), beta=0.04)
    assert not [r for r in caplog.records if "KL reference" in r.getMessage()]


def test_the_full_fine_tuning_reference_shares_the_frozen_parts():
    """Full fine-tuning with a frozen audio tower (experiment=grpo_synthetic): the KL reference copied the whole
    model, frozen parts included, which never move (the release's audio tower: about 2.5 GB more on every rank).
    They are shared now; what trains is copied; the reference still follows the policy's precision at fit start."""
    import torch
    from test_grpo import _fake_rollouts

    lit = grpo_module(_net(lora=False), beta=0.04)
    policy = dict(lit.model.named_parameters())
    shared = copied = 0
    for name, r in lit.reference.named_parameters():
        p = policy[name]
        assert not r.requires_grad
        if p.requires_grad:
            assert r.data_ptr() != p.data_ptr(), name
            copied += 1
        else:
            assert r is p, name
            shared += 1
    assert shared and copied
    assert not any(p.requires_grad for p in lit.model.audio_tower.parameters())
    lit.model.to(torch.bfloat16)  # bf16-true's cast before on_fit_start
    lit.on_fit_start()
    assert lit.reference.dtype == torch.bfloat16
    assert lit.reference.audio_tower.conv1.weight is lit.model.audio_tower.conv1.weight
    prompts, completions, owner = _fake_rollouts()
    logp, _ = lit.sequence_logprobs(lit.model, prompts, completions, owner, None, None)
    assert torch.equal(logp.detach(), lit._reference_logprobs(prompts, completions, owner, None, None))


def test_fsdp_is_refused_by_the_settings_check_before_launching(tmp_path):
    """The same refusal before any process launches (on_fit_start comes after every rank loaded the model)."""
    from test_planner import _compose, _train_overrides

    from musicflamingo.settings import GRPO_FSDP, SettingsError, check_train_settings

    _, settings = _compose("train", _train_overrides(tmp_path, "experiment=grpo", "trainer=fsdp"))
    with pytest.raises(SettingsError) as err:
        check_train_settings(settings)
    assert GRPO_FSDP in str(err.value)
    _, settings = _compose("train", _train_overrides(tmp_path, "experiment=grpo", "trainer=ddp"))
    check_train_settings(settings)
