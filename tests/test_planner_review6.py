"""The memory planner, review round 6: LoRA dropout against measured memory, and `trainer.devices` /
`trainer.strategy` values Lightning refuses (or the planner does not model) refused with the setting named."""

from __future__ import annotations

from dataclasses import replace

import pytest
import test_planner
import torch
from test_planner import (
    TOLERANCE,
    _compose,
    _one_thread,  # noqa: F401  (autouse: this file's tests on one thread too)
    _train_overrides,
    measure_step,
)

from musicflamingo.model.config import MusicFlamingoConfig
from musicflamingo.planner import MemoryPlanError, check_training, plan_training, training_setup

ALL_SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize(
    "precision,targets",
    [
        ("bf16-true", ("q_proj", "k_proj", "v_proj", "o_proj")),
        pytest.param("bf16-mixed", ALL_SEVEN, marks=pytest.mark.slow),
        pytest.param("32", ("q_proj", "v_proj"), marks=pytest.mark.slow),
    ],
)
def test_lora_dropout_plan_matches_measured_memory(tmp_path, monkeypatch, precision, targets):
    """`experiment=lora` trains with dropout 0.05: every adapter then keeps its own dropped input and dropout's
    noise (CPU) for backward. Planned from the composed settings as train.py plans it, the batch's shape put in;
    without the dropout the planner had under-predicted the peak by 17-30 % (the activations by 35-40 %)."""
    rows, text, labelled, windows = 4, 120, 40, 2
    listed = "[" + ",".join(targets) + "]"
    _, settings = _compose(
        "train",
        _train_overrides(
            tmp_path,
            "model=small",
            "experiment=lora",
            f"trainer.precision={precision}",
            f"model.net.lora.targets={listed}",
        ),
    )
    lora = settings["model"]["net"]["lora"]
    assert lora["dropout"] == 0.05 and lora["rank"] == test_planner.LORA["rank"]
    monkeypatch.setitem(test_planner.LORA, "dropout", lora["dropout"])
    torch.manual_seed(0)
    _, kept, peak = measure_step(
        "small", {}, precision, rows, text, labelled, windows, lora=True, targets=targets
    )
    config, setup = training_setup(settings)
    per_row = text + windows * MusicFlamingoConfig.from_name("small").audio.tokens_per_window
    setup = replace(setup, tokens=rows * per_row, windows=rows * windows, labelled=rows * labelled, rows=rows)
    plan = plan_training(config, setup)
    acts = plan.item("activations")
    assert abs(acts - kept) <= TOLERANCE * kept, f"activations: planned {acts:,}, kept {kept:,}"
    assert abs(plan.peak - peak) <= TOLERANCE * peak, (
        f"peak: planned {plan.peak:,}, measured {peak:,}\n{plan.table()}"
    )


def test_lora_dropout_costs_memory_on_cuda_too(tmp_path):
    """On CUDA dropout keeps a bool mask instead of CPU's noise: less than on CPU, more than without dropout."""
    base = ("model=small", "experiment=lora", "trainer=gpu", "trainer.precision=bf16-true", "plan=true")
    peaks = {}
    for dropout in (0.0, 0.05):
        _, settings = _compose(
            "train", _train_overrides(tmp_path, *base, f"model.net.lora.dropout={dropout}")
        )
        peaks[dropout] = check_training(settings).item("activations")
    _, cpu = _compose(
        "train",
        _train_overrides(
            tmp_path, *base[:2], "trainer.precision=bf16-true", "model.net.lora.dropout=0.05", "plan=true"
        ),
    )
    assert peaks[0.0] < peaks[0.05] < check_training(cpu).item("activations")


@pytest.mark.parametrize(
    "overrides,message",
    [
        (("trainer.devices=0",), "trainer.devices=0: expected a number of processes >= 1"),
        (("trainer=ddp", "trainer.devices=0"), "trainer.devices=0: expected"),
        (("trainer.devices=-2",), "trainer.devices=-2: expected"),
        (("trainer=gpu", "trainer.devices=-3"), "trainer.devices=-3: expected"),
        (("trainer.devices=1.5",), "trainer.devices=1.5: expected"),
        (("trainer.devices=two",), "trainer.devices='two': expected"),
        (("trainer.devices=[]",), r"trainer.devices=\[\]: expected a non-empty list of GPU indices"),
        (
            ("trainer.devices=[0,1]",),
            r"trainer.devices=\[0, 1\]: a list of GPU indices, but the run is on CPU",
        ),
        (("trainer=gpu", "trainer.devices=[0,0]"), "a GPU index is listed twice"),
    ],
)
def test_devices_lightning_refuses_are_refused(tmp_path, overrides, message):
    """Lightning refuses these `trainer.devices`; the planner had planned each as one device (a plan for the
    wrong run, and a refusal or a pass against the wrong budget) instead of naming the setting."""
    _, settings = _compose("train", _train_overrides(tmp_path, *overrides, "plan=true"))
    with pytest.raises(MemoryPlanError, match=message):
        check_training(settings)


@pytest.mark.parametrize(
    "overrides,devices,strategy",
    [
        (("trainer.devices='2'",), 2, "ddp"),  # Lightning reads a digit string as the number (CPU too)
        (("trainer=gpu", "trainer.devices='0,1'"), 2, "ddp"),
        (("trainer=gpu", "trainer.devices=[1,3,5]"), 3, "ddp"),
        (("trainer=ddp",), 2, "ddp"),
        (("trainer=fsdp",), 8, "fsdp"),
        (("+trainer.strategy=ddp_spawn", "trainer.devices=2"), 2, "ddp"),
        (("+trainer.strategy=auto",), 1, "single"),
    ],
)
def test_devices_and_strategies_lightning_takes_are_planned(tmp_path, overrides, devices, strategy):
    _, settings = _compose("train", _train_overrides(tmp_path, *overrides, "plan=true"))
    _, setup = training_setup(settings)
    assert (setup.devices, setup.strategy) == (devices, strategy)


@pytest.mark.parametrize(
    "value", ["foo", "deepspeed", "fsdp", "{_target_: lightning.pytorch.strategies.DeepSpeedStrategy}"]
)
def test_a_strategy_the_planner_does_not_model_is_refused_fast(tmp_path, value):
    """An unknown name (Lightning refuses it later), DeepSpeed (ZeRO is not modelled) or Lightning's own fsdp
    (no wrapping policy: the whole model is one unit, gathered at once) had been planned as one device or as
    trainer=fsdp's per-block units; refused naming the setting, and memory_check=false still runs without it."""
    overrides = ("trainer=gpu", "trainer.devices=4", f"+trainer.strategy={value}")
    _, settings = _compose("train", _train_overrides(tmp_path, *overrides, "plan=true"))
    with pytest.raises(MemoryPlanError, match=r"trainer.strategy=.*use trainer=ddp or trainer=fsdp") as err:
        check_training(settings)
    assert "memory_check=false" in str(err.value)
    _, settings = _compose("train", _train_overrides(tmp_path, *overrides, "memory_check=false"))
    check_training(settings, available=lambda device: 1)  # the escape hatch: no plan, no refusal
