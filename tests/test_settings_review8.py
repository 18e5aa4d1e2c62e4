"""Review round 8 of the training settings: precisions that cannot train are refused before anything is read."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from train_fixtures import compose_train

from musicflamingo.settings import SettingsError, check_train_settings


def test_fp16_true_training_is_refused_naming_what_works(tmp_path):
    """trainer.precision=16-true trained a step and stopped with 'loss is nan at global step 1': AdamW in fp16
    underflows (shown below with torch alone). Refused with the precisions that train."""
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    opt = torch.optim.AdamW([p], lr=1e-4)
    p.grad = torch.full((4,), 1e-5, dtype=torch.float16)  # its square, 1e-10, is 0 in fp16
    opt.step()
    assert not torch.isfinite(p).all()  # why it is refused

    def settings(precision: str):
        cfg = compose_train(
            tmp_path, tmp_path / "m.jsonl", tmp_path / "proc", [f"trainer.precision={precision}"]
        )
        return OmegaConf.to_container(cfg, resolve=True)

    with pytest.raises(SettingsError, match=r"trainer.precision='16-true': fp16 weights .* use bf16-true"):
        check_train_settings(settings("16-true"))
    for fine in ("bf16-true", "bf16-mixed", "32-true"):
        check_train_settings(settings(fine))


def test_a_bad_benchmark_max_new_tokens_is_named_as_typed():
    """eval.py benchmark.max_new_tokens=0 named `max_new_tokens` (eval.yaml's copy of it, checked first), a key the
    user did not type."""
    from hydra import compose, initialize_config_dir

    from musicflamingo.settings import check_eval_settings

    configs = str(Path(__file__).resolve().parents[1] / "configs")
    for override, named in (
        ("benchmark.max_new_tokens=0", "benchmark.max_new_tokens=0"),
        ("max_new_tokens=0", "max_new_tokens=0"),
    ):
        with initialize_config_dir(config_dir=configs, version_base="1.3"):
            cfg = compose(config_name="eval", overrides=["ckpt=x", "benchmark.root=x", override])
        with pytest.raises(SettingsError) as e:
            check_eval_settings(OmegaConf.to_container(cfg, resolve=True))
        assert str(e.value).startswith(named), str(e.value)
