"""Review 17, the end of a fine-tune: the last step is validated (and ranked by `monitor=val/loss`) whatever
`trainer.val_check_interval` is, and a run cut there continues on the right logged steps; an accumulated step's row
holds the step's throughput; a skipped micro-batch of a step that still trains is not called a skipped step."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest
from train_fixtures import compose_train, write_dataset, write_processor

from musicflamingo.training import train


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("final")
    # 4 batches of 800 tokens an epoch
    return write_processor(root / "proc"), write_dataset(root / "data", n=8)


def _val(manifest: Path, every: int) -> list[str]:
    return [
        "data.batch_max_tokens=800",
        "export=false",
        "threads=1",
        "trainer.log_every_n_steps=1",
        f"data.val={manifest}",
        "data.num_workers=0",
        f"trainer.val_check_interval={every}",
        "trainer.check_val_every_n_epoch=null",
        "callbacks.model_checkpoint.every_n_train_steps=null",
        "callbacks.model_checkpoint.monitor=val/loss",
        "callbacks.model_checkpoint.save_top_k=2",
        "model.scheduler.max_steps=8",
    ]


def _rows(run: Path, key: str) -> list[tuple[int, float]]:
    with open(run / "csv" / "metrics.csv", newline="") as f:
        return [(int(r["step"]), float(r[key])) for r in csv.DictReader(f) if r.get(key)]


def test_the_last_step_is_validated_and_ranked_whatever_the_interval(assets, tmp_path):
    """max_steps=5 validating every 3 steps: Lightning validated step 3 only, so the model the run ended with had no
    val/loss and `monitor=val/loss` never ranked it (the best file was step 3's whatever step 5 scored). Step 5 is
    validated now, and its file ranked."""
    proc, manifest = assets
    _, obj = train(compose_train(tmp_path, manifest, proc, _val(manifest, 3) + ["trainer.max_steps=5"]))
    run = tmp_path / "run"
    vals = _rows(run, "val/loss")
    assert [s for s, _ in vals] == [2, 4]  # steps 3 and 5 (rows count from 0)
    ranked = {Path(p).name: float(v) for p, v in obj["trainer"].checkpoint_callback.best_k_models.items()}
    assert ranked == pytest.approx({"step_000003.ckpt": vals[0][1], "step_000005.ckpt": vals[1][1]})


def test_a_run_shorter_than_the_validation_interval_is_validated(assets, tmp_path):
    """max_steps=2 validating every 3 steps: no validation ever ran (no val/loss, no ranked checkpoint)."""
    proc, manifest = assets
    _, obj = train(compose_train(tmp_path, manifest, proc, _val(manifest, 3) + ["trainer.max_steps=2"]))
    assert [s for s, _ in _rows(tmp_path / "run", "val/loss")] == [1]
    assert [Path(p).name for p in obj["trainer"].checkpoint_callback.best_k_models] == ["step_000002.ckpt"]


def test_a_run_cut_after_its_last_validation_continues_on_the_right_steps(assets, tmp_path):
    """Cut at max_steps=5 (validated there, last.ckpt saved after that validation) and continued to 6: Lightning
    counts a step among the logged ones after its validation, and re-counts it on resume only at a step it validates
    by the interval; the continued run logged step 6 in the row of step 5 (whose own rows were dropped)."""
    proc, manifest = assets
    train(compose_train(tmp_path, manifest, proc, _val(manifest, 3) + ["trainer.max_steps=5"]))
    run = tmp_path / "run"
    cut = _rows(run, "train/loss")
    assert [s for s, _ in cut] == [0, 1, 2, 3, 4]
    _, obj = train(compose_train(tmp_path, manifest, proc, _val(manifest, 3) + ["trainer.max_steps=6"]))
    assert obj["trainer"].global_step == 6
    resumed = _rows(run, "train/loss")
    assert [s for s, _ in resumed] == [0, 1, 2, 3, 4, 5]
    assert resumed[:5] == cut  # the cut run's rows kept, the new step in a row of its own
    assert [s for s, _ in _rows(run, "val/loss")] == [2, 4, 5]


def _fit_one_step(tmp_path: Path, last: str, monkeypatch=None):  # noqa: ANN001, ANN202
    """One optimizer step of two accumulated batches, the whole tiny data set and then `last` ("empty": every sample
    bad, "nan": a non-finite loss); returns (trainer, tokens of the first batch)."""
    from types import SimpleNamespace

    import hydra
    import lightning as L
    import torch

    from musicflamingo.data.collate import collate
    from musicflamingo.data.dataset import ConversationDataset
    from musicflamingo.data.manifest import read_manifest
    from musicflamingo.processor import MusicFlamingoProcessor

    proc_dir, manifest = write_processor(tmp_path / "proc"), write_dataset(tmp_path / "data", n=1)
    processor = MusicFlamingoProcessor.from_pretrained(proc_dir)
    dataset = ConversationDataset(read_manifest(manifest), processor)
    whole = collate([dataset[i] for i in range(len(dataset))], processor.pad_token_id)
    second = (
        collate([], processor.pad_token_id)
        if last == "empty"
        else dict(whole, input_features=whole["input_features"] * float("nan"))
    )
    if monkeypatch is not None:  # a clock that moves 1 s a reading: each batch takes 1 s
        clock = iter(range(1, 1000))
        monkeypatch.setattr(
            "musicflamingo.lit.time", SimpleNamespace(perf_counter=lambda: float(next(clock)))
        )
    cfg = compose_train(tmp_path, manifest, proc_dir, ["model.nonfinite_loss=skip"])
    torch.manual_seed(0)
    lit = hydra.utils.instantiate(cfg.model)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        accumulate_grad_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    loader = torch.utils.data.DataLoader([whole, second], batch_size=None, collate_fn=lambda b: b)
    trainer.fit(lit, loader)
    return trainer, float(whole["attention_mask"].sum())


def test_an_accumulated_steps_throughput_is_the_steps(tmp_path, monkeypatch):
    """train/tokens_per_s of a step of two accumulated batches was its last batch's: 0.0 when that batch was empty
    (every sample bad) though the step trained on the first. Now the step's tokens over its seconds."""
    trainer, tokens = _fit_one_step(tmp_path, "empty", monkeypatch)
    assert trainer.global_step == 1
    assert float(trainer.callback_metrics["train/tokens_per_s"]) == pytest.approx(tokens / 2.0)


def test_a_non_finite_accumulated_batch_is_not_called_a_skipped_step(tmp_path, caplog):
    """model.nonfinite_loss=skip with accumulate_grad_batches=2 and the second batch's loss NaN: the warning said
    "step skipped" while the step trained on the first batch (its weights moved, its row has train/loss)."""
    with caplog.at_level(logging.WARNING, logger="musicflamingo.lit"):
        trainer, _ = _fit_one_step(tmp_path, "nan")
    assert trainer.global_step == 1 and "train/loss" in trainer.callback_metrics
    assert "batch skipped, the step learns from its other accumulated batches" in caplog.text
    assert "step skipped" not in caplog.text


def test_an_early_stopped_run_logs_its_last_step(assets, tmp_path):
    """EarlyStopping ends the run after the validation of step 2 (validation every 2 steps, logging every 10):
    Lightning had decided on step 2's row before that validation, so the run's last training row was missing (here
    there was none at all: the loss the run ended with was in no log). It is written now, once, with its step."""
    proc, manifest = assets
    overrides = _val(manifest, 2) + [
        "trainer.max_steps=8",
        "trainer.log_every_n_steps=10",
        "+callbacks.early_stopping._target_=lightning.pytorch.callbacks.EarlyStopping",
        "+callbacks.early_stopping.monitor=val/loss",
        "+callbacks.early_stopping.stopping_threshold=100.0",
        "+callbacks.early_stopping.min_delta=0.0",
    ]
    overrides += ["+callbacks.early_stopping.patience=1"]
    _, obj = train(compose_train(tmp_path, manifest, proc, overrides))
    trainer = obj["trainer"]
    assert trainer.global_step == 2 and trainer.should_stop
    run = tmp_path / "run"
    assert [s for s, _ in _rows(run, "val/loss")] == [1]
    loss = _rows(run, "train/loss")
    assert [s for s, _ in loss] == [1]
    assert loss[0][1] == pytest.approx(float(trainer.callback_metrics["train/loss"]))
    assert [s for s, _ in _rows(run, "lr/language_model")] == [1]
    assert trainer.log_every_n_steps == 10
