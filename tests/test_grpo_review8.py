"""Review round 8 of GRPO: settings it cannot run with are refused before the first rollout."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from test_grpo import _net
from train_fixtures import grpo_module

from musicflamingo.grpo import GRPOConfigError


def test_fp16_loss_scaling_is_refused_at_fit_start():
    """With `trainer.precision=16-mixed` on a GPU, Lightning's GradScaler asserted "No inf checks were recorded"
    at the first batch whose groups all tied (GRPO still steps then, without gradients, to keep its step count):
    a crash minutes into the run. Refused at fit start, naming the setting and what works."""
    module = grpo_module(_net(lora=True))
    scaler = torch.amp.GradScaler("cpu")  # what Lightning builds for 16-mixed on CUDA
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    module.trainer = SimpleNamespace(precision_plugin=plugin, precision="16-mixed", max_steps=2)
    with pytest.raises(GRPOConfigError, match=r"trainer.precision='16-mixed'.*bf16-mixed"):
        module.on_fit_start()
