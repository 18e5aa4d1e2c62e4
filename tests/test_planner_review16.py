"""Review round 16, planner: GRPO micro-batches below group_size are pieces of one group (grpo.py splits them since
this round), so the update's activations are planned for micro_batch_size completions, not a whole group."""

from __future__ import annotations

from musicflamingo.model.config import MusicFlamingoConfig
from musicflamingo.planner import GRPOSetup, TrainingSetup, _grpo_plan_for, precision_of


def _setup(micro: int) -> TrainingSetup:
    return TrainingSetup(
        precision="bf16-mixed",
        train_language_model=False,
        lora_rank=8,
        lora_targets=("q_proj", "v_proj"),
        tokens=2048,
        grpo=GRPOSetup(group_size=8, max_new_tokens=256, slots=8, micro_batch_size=micro),
    )


def test_a_micro_batch_below_the_group_size_is_planned_as_that_many_completions():
    config = MusicFlamingoConfig.from_name("small")
    p = precision_of("bf16-mixed")
    # one prompt of 512 tokens: its group of 8 completions, updated 1, 2, 4 or 8 at a time
    acts = [_grpo_plan_for(config, _setup(m), p, 1, 512).item("activations") for m in (1, 2, 4, 8)]
    assert acts == sorted(set(acts)), (
        acts
    )  # strictly more with each larger piece (was a whole group each time)
