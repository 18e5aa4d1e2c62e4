"""Experiment tracking as a researcher uses it (review round 10): csv, tensorboard and W&B (offline) through a run
stopped by a signal and resumed in its folder, and the jobs of a Hydra multirun in one process; a logger that
cannot work refused in one line naming its config; ProgressLog's lines in a piped log. What W&B logged is read
back from its offline `.wandb` file."""

from __future__ import annotations

import glob
import logging
import os
import signal
import struct
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from train_fixtures import compose_train, write_dataset, write_processor

from musicflamingo.callbacks import ProgressLog, TrainingInterrupted
from musicflamingo.cli import user_error_line
from musicflamingo.training import train

COMMON = [
    "export=false",
    "trainer.log_every_n_steps=1",
    "data.batch_max_tokens=800",
    "model.scheduler.max_steps=8",
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("loggers")
    return write_processor(root / "proc"), write_dataset(root / "data", n=8)


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield wandb
    wandb.finish()


def _run(tmp: Path, assets, overrides: list[str]) -> dict:  # noqa: ANN001
    proc, manifest = assets
    _, objects = train(compose_train(tmp, manifest, proc, COMMON + overrides))
    return objects


def _wandb_records(path: Path):  # noqa: ANN202
    """The records of a W&B offline run file (a leveldb log of `wandb_internal_pb2.Record`: 7-byte header, 32 KiB
    blocks of chunks with a 7-byte header: crc, length, type full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        buf = (buf if kind in (3, 4) else b"") + data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


def _key(item) -> str:  # noqa: ANN001
    return item.key or "/".join(item.nested_key)  # "train/loss" comes as nested_key ["train", "loss"]


def _wandb_run(folder: Path) -> dict:
    """{"ids", "names", "rows" (history rows as {key: value}), "config" (keys)} over the offline runs under
    `folder`, in the order they were opened. Read after wandb.finish(); its service may still be writing the file
    (a loaded machine): each is read once it holds the run's exit record."""
    import json
    import time

    out: dict = {"ids": [], "names": [], "rows": [], "config": {}}
    for f in sorted(folder.glob("offline-run-*/*.wandb")):
        deadline = time.monotonic() + 30
        while True:
            records = list(_wandb_records(f))
            if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        for r in records:
            kind = r.WhichOneof("record_type")
            if kind == "run":
                out["ids"].append(r.run.run_id)
                out["names"].append(r.run.display_name)
            elif kind == "history":
                out["rows"].append({_key(i): json.loads(i.value_json) for i in r.history.item})
            elif kind == "config":
                out["config"].update({_key(u): json.loads(u.value_json) for u in r.config.update})
    return out


class _SignalOnce(L.Callback):
    """SIGINT once, before the batch that makes optimizer step `step` (under accumulation, its first batch)."""

    def __init__(self, step: int) -> None:
        self.step, self.sent = step, False

    def on_train_batch_start(self, trainer, *args) -> None:  # noqa: ANN001, ANN002
        if trainer.global_step == self.step - 1 and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGINT)


# ---------------------------------------------------------------------------------------------- resume
def test_a_stopped_and_resumed_run_continues_every_logger_on_the_optimizer_step(assets, tmp_path, wandb_env):
    """logger=[csv,tensorboard,wandb], 2 batches per optimizer step, stopped by SIGINT at step 2 and resumed in its
    folder (no wandb.finish() between: a run of the process's earlier logger is closed, not logged into): one W&B
    run (its id reused), TensorBoard's and W&B's train rows at optimizer steps 0..3 once each (not batch indices,
    none rewound), the learning rate of every parameter group at each, the config resolved (no `${`)."""
    common = [
        "logger=[csv,tensorboard,wandb]",
        "trainer.accumulate_grad_batches=2",
        "trainer.max_steps=4",
    ]
    probe = [f"+callbacks.sig._target_={__name__}._SignalOnce", "+callbacks.sig.step=2"]
    with pytest.raises(TrainingInterrupted, match="SIGINT at step 2"):
        _run(tmp_path, assets, [*common, *probe])
    objects = _run(tmp_path, assets, common)
    assert objects["trainer"].global_step == 4
    run = tmp_path / "run"
    groups = [g.get("name") for g in objects["model"].optimizers().optimizer.param_groups]
    assert len(groups) > 1

    wandb_env.finish()
    w = _wandb_run(run / "wandb")
    assert len(set(w["ids"])) == 1, w["ids"]
    assert (run / "wandb" / "run_id").read_text().strip() == w["ids"][0]
    train_rows = [r for r in w["rows"] if "train/loss" in r]
    assert [r["trainer/global_step"] for r in train_rows] == [0, 1, 2, 3]
    for r in train_rows:
        assert all(f"lr/{g}" in r for g in groups), sorted(r)
    assert w["config"]["trainer"]["accumulate_grad_batches"] == 2
    assert "${" not in str(w["config"]), "an unresolved interpolation in the W&B config"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps, lrs = [], []
    for f in sorted(glob.glob(str(run / "tensorboard" / "events.out.tfevents.*"))):
        ea = EventAccumulator(f, size_guidance={"scalars": 0})
        ea.Reload()
        steps += [e.step for e in ea.Scalars("train/loss")]
        lrs += [e.step for e in ea.Scalars(f"lr/{groups[-1]}")]
        assert "_hparams_/session_start_info" in ea.PluginTagToContent("hparams")
    assert steps == lrs == [0, 1, 2, 3]
    assert "${" not in (run / "tensorboard" / "hparams.yaml").read_text()


def test_a_resume_from_an_earlier_checkpoint_redraws_tensorboard_s_steps_once(assets, tmp_path):
    """A run that logged steps after its last checkpoint (killed, or resumed from an earlier `step_*.ckpt`) logs
    them again when resumed: TensorBoard showed both (two points at step 2, the curve going back); the
    resumed part now marks its first step as a restart, and TensorBoard drops the earlier part's from there on."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    every_2 = [
        "logger=tensorboard",
        "trainer.max_steps=3",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "callbacks.model_checkpoint.save_top_k=-1",
    ]
    _run(tmp_path, assets, every_2)
    _run(tmp_path, assets, [*every_2, f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'step_000002.ckpt'}"])
    ea = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0})
    ea.Reload()
    assert [e.step for e in ea.Scalars("train/loss")] == [0, 1, 2]
    assert len(list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))) == 2


# ---------------------------------------------------------------------------------------------- multirun
def _as_multirun_job(monkeypatch, num: int, overrides: list[str], argv: list[str]) -> None:  # noqa: ANN001
    from hydra.conf import HydraConf
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    hydra_cfg = OmegaConf.structured(HydraConf)
    hydra_cfg.mode = RunMode.MULTIRUN
    hydra_cfg.job.num = num
    hydra_cfg.overrides.task = overrides
    HydraConfig.instance().set_config(OmegaConf.create({"hydra": hydra_cfg}))
    monkeypatch.setattr(sys, "argv", ["train.py", "-m", *argv])


@pytest.fixture
def no_hydra_config():
    from hydra.core.hydra_config import HydraConfig

    yield
    HydraConfig.instance().cfg = None


def test_multirun_jobs_each_get_their_own_named_wandb_run(
    assets, tmp_path, wandb_env, monkeypatch, no_hydra_config
):
    """`train.py -m trainer.max_steps=1,2 logger=wandb` runs both jobs in one process: Lightning's WandbLogger
    logged the second job into the first job's run (and wrote that id into the second job's run_id, so its resume
    went there too), both named `train`. Each job now opens its own run, named after its swept value."""
    argv = ["logger=wandb", "trainer.max_steps=1,2"]
    for num, steps in enumerate((1, 2)):
        _as_multirun_job(monkeypatch, num, ["logger=wandb", f"trainer.max_steps={steps}"], argv)
        _run(tmp_path / str(num), assets, ["logger=wandb", f"trainer.max_steps={steps}"])
    wandb_env.finish()
    runs = [_wandb_run(tmp_path / str(n) / "run" / "wandb") for n in (0, 1)]
    assert runs[0]["ids"] != runs[1]["ids"] and all(len(r["ids"]) == 1 for r in runs)
    saved = [(tmp_path / str(n) / "run" / "wandb" / "run_id").read_text().strip() for n in (0, 1)]
    assert saved == [runs[0]["ids"][0], runs[1]["ids"][0]]
    assert [[r["trainer/global_step"] for r in w["rows"] if "train/loss" in r] for w in runs] == [[0], [0, 1]]
    assert [w["names"] for w in runs] == [["train #0 trainer.max_steps=1"], ["train #1 trainer.max_steps=2"]]


def test_outside_a_multirun_the_wandb_name_is_the_task_name(wandb_env, tmp_path):
    from musicflamingo.loggers import ContinuedWandbLogger

    logger = ContinuedWandbLogger(save_dir=tmp_path, name="train", project="p")
    assert logger._wandb_init["name"] == "train"


# ---------------------------------------------------------------------------------------------- failures
def _error_line(tmp_path: Path, assets, overrides: list[str]) -> str:  # noqa: ANN001
    with pytest.raises(Exception) as info:
        _run(tmp_path, assets, ["trainer.max_steps=1", *overrides])
    line = user_error_line(info.value)
    assert line is not None, f"a traceback instead of one line: {info.value!r}"
    assert not (tmp_path / "run" / "checkpoints").exists()
    return line


@pytest.mark.parametrize("which", ["csv", "tensorboard", "wandb"])
def test_a_logger_folder_that_cannot_be_written_is_one_line_naming_the_logger(
    which, assets, tmp_path, wandb_env
):
    """A file where the logger's folder goes: TensorBoard failed at its first write with "you tried to log -1 which
    is currently not supported" (a Lightning traceback); W&B wrote its run to /tmp/wandb, then failed on run_id;
    csv's line named the folder, not the logger."""
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    line = _error_line(tmp_path, assets, [f"logger={which}", f"logger.{which}.save_dir={blocker}"])
    assert line.startswith(f"logger.{which}: ") and str(blocker) in line and "Not a directory" in line, line
    assert f"logger.{which}.save_dir" in line, line


@pytest.mark.parametrize("which", ["tensorboard", "wandb"])
def test_a_logger_whose_package_is_missing_is_one_line_naming_it(which, assets, tmp_path, monkeypatch):
    """wandb (or tensorboard) not installed: Hydra's "Error in call to target ..." traceback with a
    ModuleNotFoundError, the exit status of a bug."""
    from lightning_utilities.core.imports import RequirementCache

    missing = RequirementCache("musicflamingo-no-such-package>=1")
    if which == "wandb":
        monkeypatch.setattr("lightning.pytorch.loggers.wandb._WANDB_AVAILABLE", missing)
    else:
        monkeypatch.setattr("lightning.fabric.loggers.tensorboard._TENSORBOARD_AVAILABLE", missing)
        monkeypatch.setattr("lightning.fabric.loggers.tensorboard._TENSORBOARDX_AVAILABLE", missing)
    line = _error_line(tmp_path, assets, [f"logger={which}"])
    assert line.startswith(f"logger.{which}: ") and f"pip install {which}" in line, line


# ---------------------------------------------------------------------------------------------- ProgressLog
def _progress_lines(caplog, every: int, start: int, steps: list[int]) -> list[str]:  # noqa: ANN001
    """ProgressLog's lines for a run from `start` whose batches end at global steps `steps`, then ends."""
    cb = ProgressLog(every_n_steps=every)
    trainer = SimpleNamespace(
        global_step=start,
        max_steps=steps[-1],
        estimated_stepping_batches=steps[-1],  # Lightning's: min(max_steps, the epochs' steps)
        callbacks=[],
        is_global_zero=True,
        callback_metrics={"train/loss": torch.tensor(1.5)},
    )
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="musicflamingo.callbacks"):
        cb.on_train_start(trainer, None)
        for step in steps:
            trainer.global_step = step
            cb.on_train_batch_end(trainer, None, None, {}, 0)
        cb.on_train_end(trainer, None)
    return [r.getMessage().split(" | ")[0] for r in caplog.records if r.getMessage().startswith("step ")]


def test_progress_lines_only_after_optimizer_steps_and_at_the_last_one(caplog):
    """A piped log (CI): under gradient accumulation the first batch's end (no step yet) logged "step 0/N | loss
    n/a", as did a resumed run's first batch at a multiple of every_n_steps; a run whose last step is not a
    multiple logged nothing after its last multiple (a 3-step CI run: no line with its loss at all); GRPO's batches
    of 2 optimizer steps (updates_per_batch=2) stepping over the multiples of 5 logged only at 10, 20, ..."""
    accumulating = [0, 1, 1, 2, 2, 3, 3]  # 2 batches per step
    assert _progress_lines(caplog, 2, 0, accumulating) == ["step 2/3", "step 3/3"]
    assert _progress_lines(caplog, 50, 0, [1, 2, 3]) == ["step 3/3"]
    resumed = [4, 5, 5, 6, 6, 7, 7, 8, 8]  # resumed at step 4 (a multiple), accumulating
    assert _progress_lines(caplog, 4, 4, resumed) == ["step 8/8"]
    grpo = [2, 4, 6, 8, 10, 12]  # updates_per_batch=2: the step passes 5 without landing on it
    assert _progress_lines(caplog, 5, 0, grpo) == ["step 6/12", "step 10/12", "step 12/12"]
