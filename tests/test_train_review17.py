"""Review 17, short and odd training runs: the last step's metrics reach the loggers whatever
`trainer.log_every_n_steps` is; float16 AMP with gradient accumulation learns the batches of a step whose last batch
was skipped."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from test_loss_review8 import fit_one_step
from train_fixtures import compose_train, write_dataset, write_processor

from musicflamingo.data.collate import collate
from musicflamingo.data.dataset import ConversationDataset
from musicflamingo.data.manifest import read_manifest
from musicflamingo.processor import MusicFlamingoProcessor
from musicflamingo.training import train


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("short")
    # 4 batches of 800 tokens an epoch
    return write_processor(root / "proc"), write_dataset(root / "data", n=8)


def _steps(run: Path, key: str = "train/loss") -> list[int]:
    with open(run / "csv" / "metrics.csv", newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get(key)]


def test_a_run_shorter_than_the_logging_interval_logs_its_last_step(assets, tmp_path):
    """trainer.max_steps=3 at the default log_every_n_steps=10: Lightning writes a row only at steps that are a
    multiple of 10, so the run wrote no metrics.csv at all (and no TensorBoard scalar): its loss was in no log. Its
    last step is now logged, the interval is put back afterwards."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    proc, manifest = assets
    overrides = [
        "trainer.max_steps=3",
        "data.batch_max_tokens=800",
        "export=false",
        "logger=many",
        "threads=1",
    ]
    _, obj = train(compose_train(tmp_path, manifest, proc, overrides))
    run = tmp_path / "run"
    assert obj["trainer"].log_every_n_steps == 10
    assert _steps(run) == _steps(run, "lr/language_model") == [2]  # steps count from 0 in the rows
    ea = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    assert [e.step for e in ea.Scalars("train/loss")] == [2]


def test_the_last_step_is_logged_when_it_is_not_a_multiple_of_the_interval(assets, tmp_path):
    """3 steps of 2 accumulated batches logged every 2 steps: rows of steps 1 and 2 (the last one was missing: the
    loss the run ended with, the one its export holds, was nowhere); one row for the step, after its last batch."""
    proc, manifest = assets
    overrides = [
        "data.batch_max_tokens=800",
        "export=false",
        "trainer.log_every_n_steps=2",
        "trainer.max_steps=3",
        "trainer.accumulate_grad_batches=2",
        "threads=1",
    ]
    _, obj = train(compose_train(tmp_path, manifest, proc, overrides))
    assert obj["trainer"].global_step == 3
    assert _steps(tmp_path / "run") == [1, 2]


def test_a_run_by_epochs_logs_the_last_batch_of_its_last_epoch(assets, tmp_path):
    """trainer.max_steps=-1 trainer.max_epochs=2, 4 steps an epoch, logged every 3: rows of steps 2 and 5, and of
    step 7, the last batch of the last epoch (it was missing)."""
    proc, manifest = assets
    overrides = [
        "trainer.max_steps=-1",
        "trainer.max_epochs=2",
        "trainer.log_every_n_steps=3",
        "data.batch_max_tokens=800",
        "export=false",
        "threads=1",
    ]
    _, obj = train(compose_train(tmp_path, manifest, proc, overrides))
    assert obj["trainer"].global_step == 8
    assert _steps(tmp_path / "run") == [2, 5, 7]


def test_float16_amp_learns_a_step_whose_last_accumulated_batch_was_skipped(tmp_path):
    """trainer.precision=16-mixed (a GradScaler) with accumulate_grad_batches=2 and the step's second batch empty
    (every sample bad) or non-finite: training_step returned None for it, and Lightning's AMP plugin then skipped the
    whole optimizer step, the first batch's gradients never learned (the weights did not move), while the row said
    it trained (its train/loss) with train/grad_norm of the still-scaled gradients (x 256). The step now learns the
    first batch as float32 and bf16-mixed do. (Lightning turns 16-mixed into bf16-mixed on the CPU, so the plugin is
    built here with a CPU GradScaler.)"""
    from lightning.pytorch.plugins import MixedPrecision

    proc_dir, manifest = write_processor(tmp_path / "proc"), write_dataset(tmp_path / "data", n=1)
    processor = MusicFlamingoProcessor.from_pretrained(proc_dir)
    dataset = ConversationDataset(read_manifest(manifest), processor)
    pad = processor.pad_token_id
    whole = collate([dataset[i] for i in range(len(dataset))], pad)
    cfg = compose_train(tmp_path, manifest, proc_dir, ["model.nonfinite_loss=skip"])

    def one_step(batches, accumulate, amp):  # noqa: ANN001, ANN202
        scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
        plugins = [MixedPrecision("16-mixed", "cpu", scaler)] if amp else []
        change, trainer = fit_one_step(cfg, batches, accumulate, plugins)
        return list(change.values()), float(trainer.callback_metrics["train/grad_norm"])

    reference, norm = one_step([whole], 1, amp=True)
    assert max(float(c.abs().max()) for c in reference) > 0
    nan = dict(whole, input_features=whole["input_features"] * float("nan"))
    for last in (collate([], pad), nan):
        change, skipped_norm = one_step([whole, last], 2, amp=True)
        assert skipped_norm == pytest.approx(norm, rel=1e-3)
        # the same update, up to float16 rounding (the accumulated step sums label-token-weighted losses)
        diff = torch.cat([(a - b).flatten() for a, b in zip(change, reference)]).norm()
        assert float(diff) < 1e-3 * float(torch.cat([b.flatten() for b in reference]).norm())
