"""Review 20, a fine-tune watched through its log file: each validation's metrics get a line of their own; a processor
whose windows are not the model's is refused before the model is built, naming both ways out."""

from __future__ import annotations

import csv
import logging

import pytest
from omegaconf import open_dict
from train_fixtures import compose_train, write_dataset, write_processor

from musicflamingo.training import train


def _run_with_validation(tmp_path, caplog, overrides: list[str]) -> tuple[list[str], list[dict[str, str]]]:  # noqa: ANN001
    proc = write_processor(tmp_path / "proc")
    manifest = write_dataset(tmp_path / "data", n=4)
    cfg = compose_train(tmp_path, manifest, proc, [f"data.val={manifest}", *overrides])
    with caplog.at_level(logging.INFO, logger="musicflamingo.callbacks"):
        train(cfg)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("validation at step")]
    with open(tmp_path / "run" / "csv" / "metrics.csv") as f:
        rows = [{k: v for k, v in r.items() if v} for r in csv.DictReader(f)]
    return lines, rows


def test_each_validation_logs_a_line_with_its_val_loss(tmp_path, caplog):
    """5 steps validated every 2 (and the last one, LogFinalStep): with the bar off (a file or a pipe) the progress
    lines showed the training loss only, and no line said what a validation gave; now one line per validation
    names its step and val/loss, the values metrics.csv holds (its `step` column counts from 0)."""
    overrides = [
        "export=false",
        "trainer.max_steps=5",
        "trainer.val_check_interval=2",
        "trainer.check_val_every_n_epoch=null",
        "trainer.num_sanity_val_steps=1",  # a sanity check's value is no validation of the run: no line
    ]
    lines, rows = _run_with_validation(tmp_path, caplog, overrides)
    val = {int(r["step"]) + 1: float(r["val/loss"]) for r in rows if "val/loss" in r}
    assert sorted(val) == [2, 4, 5]
    assert len(lines) == 3, lines
    for line, (step, value) in zip(lines, sorted(val.items())):
        assert line == f"validation at step {step}: val/loss {value:.4f}"


def test_no_validation_line_without_a_validation_set(tmp_path, caplog):
    proc = write_processor(tmp_path / "proc")
    manifest = write_dataset(tmp_path / "data", n=2)
    with caplog.at_level(logging.INFO, logger="musicflamingo.callbacks"):
        train(compose_train(tmp_path, manifest, proc, ["export=false", "trainer.max_steps=2"]))
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("step 2/2 | loss ") for m in messages), messages
    assert not any(m.startswith("validation at step") for m in messages)


def test_a_processor_whose_windows_are_not_the_model_s_is_refused_before_the_model_is_built(
    tmp_path, monkeypatch
):  # noqa: ANN001
    """The tiny preset (30 s windows) with a processor cutting 2 s ones: refused after the model was built (for the
    release, minutes of loading) with 'set them consistently'; now before Lightning and the model, naming the
    setting and both ways out (the processor's chunk_length, or the preset's positions for its windows)."""
    from musicflamingo.model import build

    proc = write_processor(tmp_path / "proc")  # 2 s windows
    manifest = write_dataset(tmp_path / "data", n=2)
    cfg = compose_train(tmp_path, manifest, proc, ["export=false", "trainer.max_steps=1"])
    with open_dict(cfg):
        cfg.model.net.overrides = {}  # the preset's own 30 s windows
    built = []
    monkeypatch.setattr(build, "build_model", lambda *a, **k: built.append(1))
    with pytest.raises(ValueError) as e:
        train(cfg)
    assert not built
    assert str(e.value) == (
        f"data.processor={proc}: the processor cuts audio into 2.0 s windows (its chunk_length), the model's window"
        " is 30.0 s (audio.max_source_positions=1500); use a processor saved with chunk_length=30.0, or, for a"
        " model built from a preset, +model.net.overrides.audio.max_source_positions=100 (a 2.0 s window)"
    )
    assert not (tmp_path / "run" / "checkpoints").exists()
