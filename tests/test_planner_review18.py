"""Review 18, the planner and a tied base (`tie_word_embeddings=true`, Qwen2.5-0.5B/1.5B's config): training unties
a head that trains (`lit.untie_trained_head`: its own copy, gradients and AdamW moments), so the plan of a full
fine-tune counts the head as an untied base's; a frozen tied pair (LoRA, a frozen language model) stays shared and
is planned shared; the measured memory of a real tiny step of a tied base agrees with its plan."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import test_planner
from omegaconf import OmegaConf
from test_planner import TINY, TOLERANCE, measure_step
from train_fixtures import compose_train

from musicflamingo.lit import untie_trained_head
from musicflamingo.model.config import MusicFlamingoConfig
from musicflamingo.planner import GRPOSetup, TrainingSetup, check_training, parameter_counts, plan_training

TIED = {**TINY, "text": {"tie_word_embeddings": True}}
UNTIED = {**TINY, "text": {"tie_word_embeddings": False}}
FULL = TrainingSetup(tokens=256, windows=2, labelled=64, rows=2)
LORA = replace(
    FULL, train_language_model=False, train_audio_tower=False, lora_rank=8, lora_targets=("q_proj", "v_proj")
)


@pytest.mark.parametrize(
    "setup",
    [
        FULL,
        replace(FULL, precision="bf16-mixed", checkpointing=True),
        replace(FULL, precision="bf16-true", strategy="fsdp", devices=4, device="cuda"),
        replace(FULL, strategy="ddp", devices=2, accumulate=2),
        replace(FULL, grpo=GRPOSetup(group_size=2, max_new_tokens=16, slots=None, micro_batch_size=2)),
    ],
    ids=["fp32", "bf16-mixed-ckpt", "fsdp", "ddp-accumulate", "grpo-kl"],
)
def test_a_tied_base_fully_fine_tuned_is_planned_as_training_holds_it_untied(setup):
    """A full fine-tune of a tied base: training gives the head a copy of its own (V x D weights, their gradients
    and AdamW moments, ~2 GB on Qwen2.5-0.5B), and the plan counted the head as 0 (shared with the embedding). The
    plan is now an untied base's, item for item (GRPO's KL reference copies the head too)."""
    tied, untied = (
        MusicFlamingoConfig.from_name("tiny", **TIED),
        MusicFlamingoConfig.from_name("tiny", **UNTIED),
    )
    assert parameter_counts(tied)["lm_head"] == 0  # the config as written shares the head
    planned, expected = plan_training(tied, setup), plan_training(untied, setup)
    assert planned.peak == expected.peak, f"{planned.table()}\n{expected.table()}"
    assert planned.items == expected.items
    assert planned.when == expected.when
    said = [n for n in planned.notes if n.startswith("tie_word_embeddings=true")]
    assert len(said) == 1 and "lm_head gets its own copy" in said[0]
    assert not any(n.startswith("tie_word_embeddings") for n in expected.notes)


@pytest.mark.parametrize(
    "setup",
    [
        LORA,
        replace(FULL, train_language_model=False),
        replace(LORA, precision="bf16-true", checkpointing=True),
    ],
    ids=["lora", "frozen-language-model", "lora-bf16-true"],
)
def test_a_frozen_tied_pair_stays_planned_shared(setup):
    """LoRA or a frozen language model: the tied pair is not untied (no head of its own), so the plan holds one
    V x D matrix fewer than an untied base's, and no more gradients or moments."""
    tied, untied = (
        MusicFlamingoConfig.from_name("tiny", **TIED),
        MusicFlamingoConfig.from_name("tiny", **UNTIED),
    )
    head = untied.text.vocab_size * untied.text.hidden_size
    planned, other = plan_training(tied, setup), plan_training(untied, setup)
    assert planned.item("weights") == other.item("weights") - head * 4 // (
        2 if "bf16" in setup.precision else 1
    )
    assert planned.item("gradients") == other.item("gradients")
    assert planned.item("optimizer states") == other.item("optimizer states")
    assert planned.peak == other.peak - (other.item("weights") - planned.item("weights"))
    assert not any(n.startswith("tie_word_embeddings") for n in planned.notes)


def test_plan_true_of_a_tied_base_counts_the_head_training_unties(tmp_path):
    """`train.py ... ++model.net.overrides.text.tie_word_embeddings=true plan=true`, through the composed settings:
    a full fine-tune is planned with the head's trainable parameters, LoRA without."""
    overrides = ["plan=true", "++model.net.overrides.text.tie_word_embeddings=true"]

    def planned(*extra: str):  # noqa: ANN202
        cfg = compose_train(tmp_path, tmp_path / "train.jsonl", tmp_path / "proc", [*overrides, *extra])
        settings = OmegaConf.to_container(cfg, resolve=True)
        return check_training(settings, available=lambda device: None)

    config = MusicFlamingoConfig.from_name("tiny", **TIED)
    V, D = config.text.vocab_size, config.text.hidden_size
    full = planned()
    trainable = config.num_parameters() + V * D - parameter_counts(config)["audio_positions"]
    assert f"{trainable:,} trainable parameters" in full.table()
    assert f"{config.num_parameters() + V * D:,} parameters" in full.table()
    lora = planned("model.net.lora.enabled=true")
    assert f"{config.num_parameters():,} parameters" in lora.table()


def test_a_tied_base_trains_within_its_plan(monkeypatch):
    """A real tiny step of a tied base as `MusicFlamingoLit` holds it (`untie_trained_head`), measured, against the
    plan of the config as written (tied); the vocabulary is wide enough that the head's weights, gradients and
    moments (16 x V x D bytes) are well above the tolerance: planned shared, the plan was 25 % low."""
    overrides = {**TIED, "text": {"tie_word_embeddings": True, "vocab_size": 4096}}
    written: list[MusicFlamingoConfig] = []
    build = test_planner._model

    def untied_as_training_holds_it(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        model = build(*args, **kwargs)
        written.append(copy.deepcopy(model.config))
        assert untie_trained_head(model)  # what MusicFlamingoLit does to the model it trains
        return model

    plan = test_planner.plan_training
    monkeypatch.setattr(test_planner, "_model", untied_as_training_holds_it)
    monkeypatch.setattr(test_planner, "plan_training", lambda config, setup: plan(written[-1], setup))
    planned, _, peak = measure_step("tiny", overrides, "32", 2, 60, 20, 2, keep=False)
    assert written[-1].text.tie_word_embeddings
    assert abs(planned.peak - peak) <= TOLERANCE * peak, (
        f"peak: planned {planned.peak:,}, measured {peak:,}\n{planned.table()}"
    )
