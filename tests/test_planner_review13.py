"""The memory plan of LoRA under `trainer=fsdp` (review round 13, fsdp-followups journey).

Since 97295fb `distributed.MusicFlamingoFSDP` keeps the LoRA adapters float32 over a bf16-true base, out of FSDP's
flat parameters: every device holds them, their gradients and AdamW moments whole (4 bytes each), while the rest
stays sharded. The plan took them for bf16 and sharded (and left out their float32 input copies); under bf16-mixed
they are float32 flat parameters like the rest, sharded.
"""

from __future__ import annotations

import torch

from musicflamingo.model import MusicFlamingo, MusicFlamingoConfig
from musicflamingo.model.lora import apply_lora
from musicflamingo.planner import TrainingSetup, plan_training, training_blocks

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
RANK = 8


def _counts(config: MusicFlamingoConfig) -> tuple[int, int, int]:
    """(base parameters, adapter parameters, projector parameters) of the real model with LoRA on `TARGETS`."""
    with torch.device("meta"):
        model = MusicFlamingo(config)
        apply_lora(model.language_model, rank=RANK, alpha=16, dropout=0.0, targets=TARGETS)
    adapters = sum(p.numel() for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B")))
    base = sum(p.numel() for p in model.parameters()) - adapters
    projector = sum(p.numel() for p in model.multi_modal_projector.parameters())
    return base, adapters, projector


def _setup(precision: str, strategy: str = "single", devices: int = 1) -> TrainingSetup:
    return TrainingSetup(
        precision=precision,
        device="cuda",
        strategy=strategy,
        devices=devices,
        train_audio_tower=False,
        train_language_model=False,
        lora_rank=RANK,
        lora_targets=TARGETS,
        tokens=512,
    )


def test_fsdp_bf16_true_plans_whole_float32_adapters():
    """trainer=fsdp trainer.devices=2 trainer.precision=bf16-true experiment=lora: weights = base x 2 B / 2 +
    adapters x 4 B, gradients = projector x 2 B / 2 + adapters x 4 B, states twice the gradients; each decoder
    layer's gradients are its adapters' whole, as on one device; activations as on one device (the adapters'
    float32 input copies)."""
    config = MusicFlamingoConfig.from_name("tiny")
    base, adapters, projector = _counts(config)
    fsdp = plan_training(config, _setup("bf16-true", "fsdp", 2))
    single = plan_training(config, _setup("bf16-true"))
    assert fsdp.item("weights") == base * 2 // 2 + adapters * 4
    assert fsdp.item("gradients") == projector * 2 // 2 + adapters * 4
    assert fsdp.item("optimizer states") == 2 * fsdp.item("gradients")
    assert fsdp.item("activations") == single.item("activations")
    assert "adapters whole on each" in fsdp.table()

    layers = config.text.num_hidden_layers
    grads = {b.name: b.grad for b in training_blocks(config, _setup("bf16-true", "fsdp", 2))}
    one = {b.name: b.grad for b in training_blocks(config, _setup("bf16-true"))}
    for i in range(layers):
        assert grads[f"decoder layer {i}"] == one[f"decoder layer {i}"] == adapters * 4 // layers
    assert grads["projector"] == one["projector"] // 2 == projector * 2 // 2


def test_fsdp_bf16_mixed_shards_the_adapters():
    """Under bf16-mixed the float32 adapters are flat parameters like the float32 base: all sharded."""
    config = MusicFlamingoConfig.from_name("tiny")
    base, adapters, projector = _counts(config)
    fsdp = plan_training(config, _setup("bf16-mixed", "fsdp", 2))
    assert fsdp.item("weights") == (base + adapters) * 4 // 2
    assert fsdp.item("gradients") == (projector + adapters) * 4 // 2
    grads = {b.name: b.grad for b in training_blocks(config, _setup("bf16-mixed", "fsdp", 2))}
    assert grads["decoder layer 0"] == adapters * 4 // config.text.num_hidden_layers // 2
    assert "whole on each" not in fsdp.table()
