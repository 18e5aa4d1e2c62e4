"""Review 17, W&B rewinding (`logger.wandb.rewind=true`) on a resume from a checkpoint ranked by `val/loss`: the
first step the resumed run logs is the one W&B is rewound to before, whether the file was saved by a validation in
the middle of an epoch (`trainer.val_check_interval=3`) or at an epoch's end (`check_val_every_n_epoch=1`)."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import test_loggers_review12 as r12

from musicflamingo.loggers import first_logged_step

assets, wandb_env = r12.assets, r12.wandb_env


def _ranked(manifest: Path, val: list[str]) -> list[str]:
    return [
        "logger=[csv,wandb]",
        "logger.wandb.rewind=true",
        f"data.val={manifest}",
        "data.num_workers=0",
        *val,
        "callbacks.model_checkpoint.every_n_train_steps=null",
        "callbacks.model_checkpoint.monitor=val/loss",
        "callbacks.model_checkpoint.save_top_k=-1",
    ]


def _csv_steps(run: Path, key: str) -> list[int]:
    with open(run / "csv" / "metrics.csv", newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get(key)]


def _resume_rewinds_to_the_first_logged_step(
    tmp_path, assets, wandb_env, caplog, overrides, ckpt: str
) -> None:  # noqa: ANN001
    run = tmp_path / "run"
    r12._train(tmp_path, assets, overrides)
    wandb_env.finish()
    first_run = _csv_steps(run, "train/loss")
    path = run / "checkpoints" / ckpt
    with caplog.at_level(logging.WARNING, logger="musicflamingo.loggers"):
        r12._train(tmp_path, assets, [*overrides, f"ckpt_path={path}"])
        wandb_env.finish()
    messages = [r.getMessage() for r in caplog.records if "logger.wandb" in r.getMessage()]
    assert not [m for m in messages if "but this run logs from" in m], messages
    # the resumed run's first row: metrics.csv keeps the rows before it, the resumed run's from it on
    resumed = _csv_steps(run, "train/loss")
    assert resumed == first_run
    parts = r12._wandb_parts(run / "wandb")
    assert len(parts) == 2 and len({p["id"] for p in parts}) == 1, parts
    first = parts[1]["rows"][0]["g"]
    assert first_logged_step(path) == first
    last_before = max(r["s"] for r in parts[0]["rows"] if r["g"] < first)
    assert parts[1]["branch"] == (parts[0]["id"], "_step", last_before), parts[1]
    history = r12._synced_history(parts)
    assert sorted({r["g"] for r in history}) == first_run
    assert [r["s"] for r in history] == list(range(len(history)))


def test_a_resume_from_a_file_saved_by_a_validation_mid_epoch_rewinds_w_and_b_to_its_first_row(
    assets, tmp_path, wandb_env, caplog
):
    """Validation every 2 steps (4 batches an epoch), run to step 3, resumed from step_000002.ckpt (as from
    step_000006.ckpt validating every 3 steps): Lightning's resumed run logs its first row at step 2 (it passes back
    through the end of the saved batch and counts it), but `first_logged_step` said 1, so the W&B run was rewound
    past step 1's train and val rows, which nothing logged again, and the run warned "rewound to before step 1, but
    this run logs from step 2"."""
    manifest = assets[1]
    val = ["trainer.val_check_interval=2", "trainer.check_val_every_n_epoch=null", "trainer.max_steps=3"]
    _resume_rewinds_to_the_first_logged_step(
        tmp_path, assets, wandb_env, caplog, _ranked(manifest, val), "step_000002.ckpt"
    )


def test_a_resume_from_a_file_saved_at_an_epochs_end_rewinds_w_and_b_to_its_first_row(
    assets, tmp_path, wandb_env, caplog
):
    """Validation at each epoch's end (4 batches an epoch), run to step 6, resumed from step_000004.ckpt."""
    manifest = assets[1]
    val = ["trainer.check_val_every_n_epoch=1", "trainer.max_steps=6"]
    _resume_rewinds_to_the_first_logged_step(
        tmp_path, assets, wandb_env, caplog, _ranked(manifest, val), "step_000004.ckpt"
    )


def test_a_run_whose_last_step_ends_an_epoch_off_the_interval_continues_on_the_right_steps(assets, tmp_path):
    """4 batches an epoch, validation every 3 steps, run to step 8 (the last step, validated as such, ends epoch 2;
    last.ckpt saved after that validation) and continued to step 10: the resume does not validate step 8 again (no
    multiple of 3), so it never counted it among the logged steps, and every later row was logged one step early
    (step 9's loss in the row of step 8, whose own rows were dropped; step 10's row missing). The file now holds
    the count with step 8 in it, and the first step it resumes on (8)."""
    manifest = assets[1]
    val = [
        f"data.val={manifest}",
        "data.num_workers=0",
        "trainer.val_check_interval=3",
        "trainer.check_val_every_n_epoch=null",
        "callbacks.model_checkpoint.every_n_train_steps=null",
        "callbacks.model_checkpoint.monitor=val/loss",
    ]
    run = tmp_path / "run"
    r12._train(tmp_path, assets, [*val, "trainer.max_steps=8"])
    assert _csv_steps(run, "train/loss") == list(range(8))
    marked = first_logged_step(run / "checkpoints" / "last.ckpt")
    obj = r12._train(tmp_path, assets, [*val, "trainer.max_steps=10"])
    assert obj["trainer"].global_step == 10
    assert _csv_steps(run, "train/loss") == list(range(10))
    assert _csv_steps(run, "val/loss") == [2, 5, 7, 8, 9]  # steps 3, 6, 8 (the last), 9, 10 (the last)
    assert marked == 8
