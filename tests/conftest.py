"""Test-wide settings: deterministic, offline, small thread pools (the CI machine has 2 cores)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_threads():
    """`train(cfg)` with `threads=N` sets the process-wide torch thread count: put the test-wide value back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
