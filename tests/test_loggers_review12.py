"""Review round 12, "loggers and the run folder": the run's `.hydra/` config written whole or not at all, eval.py
runs that end before their folder's lock leaving no empty `eval.log`, W&B's offline run rewound (logger.wandb.rewind=true)
across a resume from an earlier checkpoint so that no step is drawn twice, and such a resume keeping `last.ckpt` its own."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import test_loggers_review10
from omegaconf import OmegaConf

from musicflamingo.runfolder import FolderLock, JobLog, save_run_config

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- .hydra/
def test_a_run_config_write_cut_midway_leaves_the_old_config_whole(tmp_path, monkeypatch):
    """save_run_config wrote `.hydra/config.yaml` in place: a kill mid-write (here: the write failing after half the
    text) left a cut file, the folder's only record of the settings its checkpoints were trained with. Now it goes
    through a temporary file: the old config stays whole, and a killed write's temporary file is removed by the next
    save (the folder's lock is held)."""
    old = OmegaConf.create({"trainer": {"max_steps": 10}, "model": {"optimizer": {"lr": 0.001}}})
    save_run_config(old, tmp_path)
    config = tmp_path / ".hydra" / "config.yaml"
    before = config.read_text()

    real_save = OmegaConf.save

    def cut_save(cfg, f, resolve=False):  # noqa: ANN001, ANN202
        real_save(cfg, f, resolve=resolve)
        text = Path(f).read_text()
        Path(f).write_text(text[: len(text) // 2])
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(OmegaConf, "save", cut_save)
    with pytest.raises(KeyboardInterrupt):
        save_run_config(OmegaConf.create({"trainer": {"max_steps": 20}, "model": {"x": 1}}), tmp_path)
    monkeypatch.setattr(OmegaConf, "save", real_save)
    assert config.read_text() == before
    assert OmegaConf.load(config).trainer.max_steps == 10

    leftover = tmp_path / ".hydra" / ".config.yaml.abcd1234.tmp"  # what a SIGKILL mid-write leaves
    leftover.write_text("trainer:\n  max_")
    save_run_config(OmegaConf.create({"trainer": {"max_steps": 30}}), tmp_path)
    assert OmegaConf.load(config).trainer.max_steps == 30
    assert sorted(p.name for p in (tmp_path / ".hydra").iterdir()) == ["config.yaml"]


# ---------------------------------------------------------------------------------------------- eval.log
@pytest.fixture
def hydra_job_log(tmp_path):
    """Hydra's run as eval.py gets it: HydraConfig set, and its job log's FileHandler on the root logger (which
    creates `<folder>/eval.log`, empty)."""
    from hydra.conf import HydraConf
    from hydra.core.hydra_config import HydraConfig

    folder = tmp_path / "out"
    folder.mkdir()
    hydra_cfg = OmegaConf.structured(HydraConf)
    hydra_cfg.runtime.output_dir = str(folder)
    hydra_cfg.job.name = "eval"
    HydraConfig.instance().set_config(OmegaConf.create({"hydra": hydra_cfg}))
    handler = logging.FileHandler(folder / "eval.log", mode="a")
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield folder
    finally:
        root.removeHandler(handler)
        handler.close()
        for h in list(root.handlers):
            if isinstance(h, logging.FileHandler) and h.baseFilename == str(folder / "eval.log"):
                root.removeHandler(h)
                h.close()
        HydraConfig.instance().cfg = None


def _lock(folder: str) -> FolderLock:
    return FolderLock(folder, "eval.lock", "eval.py", "pass output_dir=<another folder>")


def test_a_job_log_never_written_stays_in_a_folder_another_run_holds(hydra_job_log):
    """A folder another eval.py holds keeps its log as it is (that run writes it once it has the lock)."""
    log_file = hydra_job_log / "eval.log"
    with _lock(str(hydra_job_log)):  # another eval.py runs in the folder
        with JobLog(lock=_lock):
            logging.getLogger("musicflamingo.test").warning("refused")
    assert log_file.is_file() and log_file.read_text() == ""


def test_a_job_log_never_written_is_removed_when_the_folder_is_free(hydra_job_log):
    """An eval.py that ends before its lock (a bad setting, plan=true) left the empty `eval.log` Hydra opened; it is
    removed once the folder's lock is free."""
    log_file = hydra_job_log / "eval.log"
    with JobLog(lock=_lock):
        logging.getLogger("musicflamingo.test").warning("bad setting")
    assert not log_file.exists()
    assert not (hydra_job_log / "eval.lock").exists()


def test_a_job_log_written_under_the_lock_stays(hydra_job_log):
    log_file = hydra_job_log / "eval.log"
    with JobLog(lock=_lock) as job_log:
        logging.getLogger("musicflamingo.test").warning("before the lock")
        with _lock(str(hydra_job_log)):
            job_log.write()
    assert "before the lock" in log_file.read_text()


def test_eval_py_with_a_bad_setting_leaves_no_empty_eval_log(tmp_path):
    """The command line as a researcher types it: a refused eval.py into a new folder left an empty `eval.log` (its
    lines went to the console only)."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(
        [sys.executable, str(ROOT / "eval.py"), "limit=-1", f"output_dir={out}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "eval.py: error" in done.stderr
    assert not (out / "eval.log").exists()
    assert not (out / "eval.lock").exists()


# ---------------------------------------------------------------------------------------------- W&B offline resume
# test_loggers_review10's run settings and fixtures (8 clips and a processor; offline W&B in the test's folder)
COMMON = test_loggers_review10.COMMON
assets, wandb_env = test_loggers_review10.assets, test_loggers_review10.wandb_env


def _train(tmp: Path, assets, overrides: list[str]) -> dict:  # noqa: ANN001
    from train_fixtures import compose_train

    from musicflamingo.training import train

    proc, manifest = assets
    return train(compose_train(tmp, manifest, proc, COMMON + overrides))[1]


def _wandb_parts(folder: Path) -> list[dict]:
    """Each offline run file under `folder`, in the order the parts ran: its run id, branch point (rewind) and
    history rows ({"g": trainer/global_step, "s": _step, "loss": train/loss or None})."""
    import json
    import time

    from test_loggers_review10 import _key, _wandb_records

    parts = []
    for f in folder.glob("offline-run-*/*.wandb"):
        deadline = time.monotonic() + 30
        while True:  # its service may still be writing it (a loaded machine)
            records = list(_wandb_records(f))
            if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        part: dict = {"rows": [], "branch": None}
        for r in records:
            kind = r.WhichOneof("record_type")
            if kind == "run":
                part["id"], part["start"] = r.run.run_id, r.run.start_time.ToNanoseconds()
                if r.run.HasField("branch_point") and r.run.branch_point.run:
                    bp = r.run.branch_point
                    part["branch"] = (bp.run, bp.metric, int(bp.value))
            elif kind == "history":
                row = {_key(i): json.loads(i.value_json) for i in r.history.item}
                if "trainer/global_step" in row:
                    part["rows"].append({"g": row["trainer/global_step"], "s": row["_step"]})
        parts.append(part)
    return sorted(parts, key=lambda p: p["start"])


def _synced_history(parts: list[dict]) -> list[dict]:
    """The W&B run's history as `wandb sync` makes it from the parts, in order: a part with a branch point on its own
    run rewinds the history to that `_step` (rows after it dropped), its own `_step` continuing from there; a plain
    resume counts `_step` from 0 again, appended after the rows before it."""
    rows: list[dict] = []
    for part in parts:
        if part["branch"] is not None:
            run, metric, value = part["branch"]
            assert run == part["id"] and metric == "_step"
            rows = [r for r in rows if r["s"] <= value]
            rows += part["rows"]
        else:
            offset = max((r["s"] for r in rows), default=-1) + 1
            rows += [{**r, "s": r["s"] + offset} for r in part["rows"]]
    return rows


def test_an_offline_wandb_run_resumed_from_an_earlier_checkpoint_is_rewound_not_drawn_twice(
    assets, tmp_path, wandb_env, caplog
):
    """logger=wandb offline, run to step 3 (checkpoints at 2), then resumed from step_000002.ckpt: the resumed part
    logged step 2 again into the same W&B run, which then held it twice (the curve going back, where TensorBoard and
    metrics.csv keep the resumed part's only). Now the W&B run is rewound to the last row before step 2, with a
    warning naming the steps and what syncing it needs. A resume that logs no step twice (ckpt_path=last, more steps)
    stays W&B's plain resume. The folder's step map is the synced history's."""
    every_2 = [
        "logger=wandb",
        "logger.wandb.rewind=true",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "callbacks.model_checkpoint.save_top_k=-1",
    ]
    run = tmp_path / "run"
    _train(tmp_path, assets, ["trainer.max_steps=3", *every_2])
    wandb_env.finish()
    with caplog.at_level(logging.WARNING, logger="musicflamingo.loggers"):
        _train(
            tmp_path,
            assets,
            ["trainer.max_steps=3", *every_2, f"ckpt_path={run / 'checkpoints' / 'step_000002.ckpt'}"],
        )
        wandb_env.finish()
    rewound = [r.getMessage() for r in caplog.records if "rewound" in r.getMessage()]
    assert len(rewound) == 1 and "logs step 2 again from step_000002.ckpt" in rewound[0], rewound
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="musicflamingo.loggers"):
        _train(tmp_path, assets, ["trainer.max_steps=4", *every_2])  # ckpt_path=last: step 3 on, none twice
        wandb_env.finish()
    assert not [r for r in caplog.records if "logger.wandb" in r.getMessage()]

    parts = _wandb_parts(run / "wandb")
    assert len(parts) == 3 and len({p["id"] for p in parts}) == 1, parts
    assert [r["g"] for r in parts[0]["rows"]] == [0, 1, 2]
    last_before = max(r["s"] for r in parts[0]["rows"] if r["g"] < 2)
    assert parts[1]["branch"] == (parts[0]["id"], "_step", last_before), parts[1]
    assert parts[1]["rows"][0]["s"] == last_before + 1  # `_step` continues
    assert parts[2]["branch"] is None  # nothing logged twice: a plain resume
    history = _synced_history(parts)
    assert [r["g"] for r in history] == [0, 1, 2, 3]
    assert [r["s"] for r in history] == list(range(len(history)))
    steps = (run / "wandb" / f"{parts[0]['id']}.steps").read_text().split()
    assert [int(x) for x in steps] == [v for r in history for v in (r["g"], r["s"])]


# ---------------------------------------------------------------------------------------------- last.ckpt
def test_a_run_resumed_from_an_earlier_checkpoint_keeps_last_ckpt_its_own(assets, tmp_path):
    """Resumed from step_000002.ckpt (saved before the first last.ckpt, so its callback state names none), the run
    wrote last-v1.ckpt beside the abandoned run's last.ckpt (step 3), and the next default resume (ckpt_path=last)
    continued the abandoned run. Now the resumed run overwrites last.ckpt."""
    import torch

    every_2 = [
        "trainer.max_steps=3",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "callbacks.model_checkpoint.save_top_k=-1",
    ]
    _train(tmp_path, assets, every_2)
    ckpts = tmp_path / "run" / "checkpoints"
    _train(tmp_path, assets, ["trainer.max_steps=4", *every_2[1:], f"ckpt_path={ckpts / 'step_000002.ckpt'}"])
    names = sorted(p.name for p in ckpts.iterdir())
    assert not [n for n in names if n.startswith("last-")], names
    assert torch.load(ckpts / "last.ckpt", weights_only=True, mmap=True)["global_step"] == 4


@pytest.mark.parametrize("kind", ["file", "sharded folder", "folder cut short"])
def test_own_last_checkpoint_takes_the_folders_last_ckpt_file_or_sharded_folder(tmp_path, kind):
    """A sharded FSDP checkpoint (state_dict_type=sharded) is a folder with meta.pt: a run resumed from an earlier
    one took no `last.ckpt` folder as its own and would write last-v1.ckpt beside it."""
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import ModelCheckpoint

    from musicflamingo.callbacks import OwnLastCheckpoint

    last = tmp_path / "last.ckpt"
    if kind == "file":
        last.write_bytes(b"x")
    else:
        last.mkdir()
        if kind == "sharded folder":
            (last / "meta.pt").write_bytes(b"x")
    cb = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    OwnLastCheckpoint().on_train_start(SimpleNamespace(checkpoint_callbacks=[cb]), None)
    assert cb.last_model_path == ("" if kind == "folder cut short" else str(last))
