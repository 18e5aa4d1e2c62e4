"""Run control and settings (issue 16, part B): oversized samples counted as bad ones, one settings check per entry
point before anything is read, unknown keys refused, SIGTERM / SIGINT stop with a checkpoint and exit 143 / 130, a
run folder's lock, `eval.py max_new_tokens` refused, and `run_cli`'s split between bad input (one line, exit 2)
and bugs (traceback).

The signal and lock tests run `train.py` in a subprocess (bounded by timeouts) and watch a marker file the
`StepMarker` callback writes after every training step; the rest run in-process through `run_cli`, as the entry
points do.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from tiny_assets import make_tone, write_audio
from tiny_checkpoint import write_tiny_checkpoint
from train_fixtures import CONFIGS, TINY_OVERRIDES, compose_train, write_dataset, write_processor

from musicflamingo.callbacks import AtomicCheckpointIO
from musicflamingo.cli import run_cli
from musicflamingo.data.dataset import BadSampleError, TooManyBadSamplesError
from musicflamingo.training import train

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


class StepMarker(Callback):
    """Writes `{"pid", "step"}` to `path` after every training step, then sleeps (so a signal lands mid-run)."""

    def __init__(self, path: str, seconds: float = 0.3, hold: str | None = None) -> None:
        self.path, self.seconds = Path(path), seconds
        self.hold = Path(hold) if hold else None  # while this file exists, the run waits after each step

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "step": trainer.global_step}))
        os.replace(tmp, self.path)
        time.sleep(self.seconds)
        while self.hold is not None and self.hold.exists():
            time.sleep(0.05)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {
        "proc": write_processor(root / "proc"),
        "manifest": write_dataset(root / "data"),
        "ckpt": write_tiny_checkpoint(root / "ckpt"),
    }


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]))
    return env


def _cli(fn: Callable[[], Any], capsys, prefix: str = "error") -> tuple[int, list[str]]:
    """`run_cli(fn)` as the entry points call it: (exit code, stderr lines)."""
    with pytest.raises(SystemExit) as info:
        run_cli(fn, prefix=prefix)
    return info.value.code, capsys.readouterr().err.strip().splitlines()


TRAIN_ARGS = [
    "trainer.max_steps=12",
    "model.scheduler.max_steps=12",
    "model.scheduler.warmup_steps=2",
    "callbacks.model_checkpoint.every_n_train_steps=12",  # before the last step, only a signal writes last.ckpt
    "data.batch_max_tokens=800",
    "export=false",
    "threads=1",
]


def _train_cmd(assets: dict[str, Path], run: Path, marker: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "train.py"),
        f"data.train={assets['manifest']}",
        f"data.processor={assets['proc']}",
        f"+model.net.overrides={TINY_OVERRIDES}",
        f"hydra.run.dir={run}",
        f"paths.log_dir={run.parent / 'logs'}",
        "trainer.enable_progress_bar=false",
        "+callbacks.marker._target_=test_robustness_runs.StepMarker",
        f"+callbacks.marker.path={marker}",
        *TRAIN_ARGS,
        *extra,
    ]


def _wait_for_step(proc: subprocess.Popen, marker: Path, step: int, timeout: float = 180.0) -> dict:
    """The marker's content once the run has finished `step` steps (the run must still be alive)."""
    deadline = time.monotonic() + timeout
    while True:
        if marker.is_file():
            seen = json.loads(marker.read_text())
            if seen["step"] >= step:
                return seen
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out = proc.communicate()[0] or ""
            raise AssertionError(f"step {step} not reached (rc {proc.returncode}):\n{out[-3000:]}")
        time.sleep(0.02)


def _popen(cmd: list[str], **kwargs: Any) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), **kwargs
    )


def _ckpt(path: Path) -> dict:
    return AtomicCheckpointIO().load_checkpoint(path)


# ---------------------------------------------------------------------------------------------- item 5
def _text_records(path: Path, n_long: int, n_short: int = 1) -> Path:
    """`n_short` short and `n_long` long text-only conversations (314 and 1204 tokens with the tiny processor)."""
    lines = []
    for i in range(n_short + n_long):
        answer = "a bright tone" if i < n_short else " ".join(["a very high whistle"] * 60)
        conv = [{"role": "user", "content": "What is this?"}, {"role": "assistant", "content": answer}]
        lines.append(json.dumps({"id": f"t{i}", "conversations": conv}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_oversized_samples_are_bad_samples_counted_and_reported(assets, tmp_path):
    """19 of 20 records over `data.batch_max_tokens`, bad_sample_policy=skip: every one is reported by id and
    `file:line` and counted (each epoch visits them again), and the count stops the run past max_bad_fraction."""
    manifest = _text_records(tmp_path / "long.jsonl", n_long=19)
    common = [
        "data.batch_max_tokens=600",
        "data.bad_sample_policy=skip",
        "data.max_bad_fraction=0.5",
        "model.scheduler.max_steps=10",
        "export=false",
    ]
    # 40 visits, fewer than BadSampleTracker.min_seen: no stop during the run, but its end checks the whole run
    # (such a run used to finish and export, 95 % of its samples skipped)
    with pytest.raises(TooManyBadSamplesError, match="38 of 40 .*the model is not exported"):
        train(
            compose_train(
                tmp_path / "a", manifest, assets["proc"], [*common, "trainer.max_steps=2", "export=true"]
            )
        )
    run = tmp_path / "a" / "run"
    assert (run / "checkpoints" / "last.ckpt").is_file() and not (run / "export").exists()
    bad = [json.loads(x) for x in (run / "bad_samples.jsonl").read_text().splitlines()]
    assert sorted(b["id"] for b in bad) == sorted(f"t{i}" for i in range(1, 20))
    assert {b["source"] for b in bad} == {f"{manifest}:{i}" for i in range(2, 21)}
    assert all("more than data.batch_max_tokens=600" in b["reason"] for b in bad), bad[0]
    summary = json.loads((run / "bad_samples.summary.json").read_text())
    assert summary["bad"] == 38 and summary["seen"] == 40  # two epochs of one batch: 1 good + 19 bad each

    # 100 visits (BadSampleTracker.min_seen) at 95 % bad: the run stops, as for any bad sample
    cfg = compose_train(tmp_path / "b", manifest, assets["proc"], [*common, "trainer.max_steps=10"])
    with pytest.raises(TooManyBadSamplesError, match="more than max_bad_fraction"):
        train(cfg)


def test_min_audio_seconds_is_a_data_setting(assets, tmp_path):
    """`data.min_audio_seconds` is in the data config (it was only reachable as `+data.min_audio_seconds`)."""
    manifest = _text_records(tmp_path / "short.jsonl", n_long=0)
    assert compose_train(tmp_path, manifest, assets["proc"], []).data.min_audio_seconds == 0.1
    cfg = compose_train(tmp_path, manifest, assets["proc"], ["data.min_audio_seconds=0.01"])
    assert hydra.utils.instantiate(cfg.data).dataset_kwargs["min_audio_seconds"] == 0.01


def test_oversized_sample_under_error_policy_names_the_record_and_the_setting(assets, tmp_path):
    from musicflamingo.data.datamodule import MusicFlamingoDataModule

    manifest = _text_records(tmp_path / "long.jsonl", n_long=2)
    dm = MusicFlamingoDataModule(train=str(manifest), processor=str(assets["proc"]), batch_max_tokens=600)
    with pytest.raises(BadSampleError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert f"sample 't1' ({manifest}:2)" in message and "1 more sample(s)" in message
    assert "data.batch_max_tokens=600" in message and "data.bad_sample_policy=skip" in message
    assert "on_oversized" not in message


# ---------------------------------------------------------------------------------------------- item 7
BOGUS_INIT = (
    "/nonexistent/musicflamingo-checkpoint"  # read first by the model build: a clean check never gets there
)


@pytest.mark.parametrize(
    "override, named",
    [
        ("model.optimizer.lr=-1e-2", "model.optimizer.lr=-0.01: expected a finite number > 0"),
        ("model.optimizer.lr=nan", "model.optimizer.lr=nan"),
        (
            "model.optimizer.betas=[0.9,1.0]",
            "model.optimizer.betas=[0.9, 1.0]: expected two numbers in [0, 1)",
        ),
        (
            "model.scheduler.warmup_steps=50",
            "model.scheduler.warmup_steps=50 is more than model.scheduler.max_steps=12",
        ),
        ("data.batch_max_tokens=0", "data.batch_max_tokens=0: expected an integer >= 1"),
        ("data.val_batch_max_tokens=0", "data.val_batch_max_tokens=0"),
        ("seed=abc", "seed='abc': expected an integer"),
        ("trainer.max_steps=-1", "the run would never end"),
        ("model.net.lora.rank=0", "model.net.lora.rank=0"),
        # a ZeroDivisionError traceback in Lightning (the two below)
        ("trainer.val_check_interval=0", "trainer.val_check_interval=0: expected an integer >= 1"),
        ("trainer.check_val_every_n_epoch=0", "trainer.check_val_every_n_epoch=0: expected an integer >= 1"),
        ("trainer.val_check_interval=1.5", "a fraction in (0, 1] of an epoch"),
        # was reported as model.scheduler.max_steps='abc' (the interpolation of it, checked first)
        (
            "trainer.max_steps=abc model.scheduler.max_steps=${trainer.max_steps}",
            "trainer.max_steps='abc': expected an integer",
        ),
        (
            "trainer.accelerator=tpu",
            "trainer.accelerator='tpu': expected 'cpu' or 'gpu'",
        ),  # torch_xla traceback
    ],
)
def test_train_settings_are_checked_before_anything_is_read(override, named, assets, tmp_path, capsys):
    """Exit 2 with one line naming the setting and its value; the model's checkpoint (a missing folder here) is not
    opened and the run folder not created."""
    cfg = compose_train(
        tmp_path,
        assets["manifest"],
        assets["proc"],
        [f"model.net.init_from={BOGUS_INIT}", *TRAIN_ARGS, *override.split(" ")],
    )
    code, err = _cli(lambda: train(cfg), capsys)
    assert code == 2 and len(err) == 1 and named in err[0], err
    assert not (tmp_path / "run").exists()


def test_a_schedule_by_trainer_steps_with_only_max_time_is_a_settings_error(assets, tmp_path, capsys):
    """trainer.max_steps=-1, max_epochs=-1, max_time set: the run ends by time, so the schedule's length
    (model.scheduler.max_steps=-1: the trainer's estimate) has none; exit 2 naming it, not int(inf) at fit."""
    overrides = ["trainer.max_steps=-1", "trainer.max_epochs=-1", "+trainer.max_time=00:00:00:20"]
    cfg = compose_train(
        tmp_path, assets["manifest"], assets["proc"], [f"model.net.init_from={BOGUS_INIT}", *overrides]
    )
    code, err = _cli(lambda: train(cfg), capsys)
    assert code == 2 and len(err) == 1 and "model.scheduler.max_steps=-1" in err[0], err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- item 8
@pytest.mark.parametrize(
    "override, named, valid",
    [
        (
            "+model.net.lora.rnk=4",
            "model.net.lora.rnk=4: unknown setting (did you mean model.net.lora.rank?)",
            "rank",
        ),
        (
            "+model.scheduler.warmup_step=100",
            "model.scheduler.warmup_step=100: unknown setting (did you mean model.scheduler.warmup_steps?)",
            "warmup_steps",
        ),
        ("+model.lora.rnk=4", "model.lora={'rnk': 4}: unknown setting (did you mean model.net.lora?)", "net"),
        (
            "+model.optim.lr=1",
            "model.optim={'lr': 1}: unknown setting (did you mean model.optimizer?)",
            "optimizer",
        ),
        ("+data.batch_max_token=10", "data.batch_max_token=10: unknown setting", "batch_max_tokens"),
        ("+exprt=false", "exprt=False: unknown setting (did you mean export?)", "export"),
    ],
)
def test_a_key_typo_fails_with_the_valid_keys(override, named, valid, assets, tmp_path, capsys):
    """`+key` adds a key to Hydra's config even where nothing reads it; the train check refuses it, listing the
    valid keys of that node, before the model's checkpoint is opened."""
    cfg = compose_train(
        tmp_path, assets["manifest"], assets["proc"], [f"model.net.init_from={BOGUS_INIT}", override]
    )
    code, err = _cli(lambda: train(cfg), capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {named}"), err
    assert "takes: " in err[0] and valid in err[0].split("takes: ")[1].split(", "), err


# ---------------------------------------------------------------------------------------------- items 9, 10
@pytest.fixture(scope="module")
def sigterm_run(assets, tmp_path_factory) -> dict[str, Any]:
    """One `train.py ... && touch carried_on` run, held after its first step while a second train.py into the same
    run folder runs (and is refused: item 10), then let go and sent SIGTERM once it has finished 2 steps (item 9).
    What both tests check, recorded; the SIGTERM test resumes the run folder afterwards (the lock test reads only
    what is recorded here)."""
    tmp = tmp_path_factory.mktemp("sigterm")
    run, marker, flag, hold = tmp / "run", tmp / "marker.json", tmp / "carried_on", tmp / "hold"
    cmd = _train_cmd(assets, run, marker)
    held = [*cmd, f"+callbacks.marker.hold={hold}"]
    shell = " ".join(f"'{c}'" for c in held) + f" && touch '{flag}'"
    hold.touch()
    proc = _popen(["bash", "-c", shell])
    try:
        first = _wait_for_step(proc, marker, 1)
        config_before = (run / ".hydra" / "config.yaml").read_text()
        second = subprocess.run(
            _train_cmd(assets, run, tmp / "marker2.json", "seed=1"),
            env=_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        in_use = {
            "second": second,
            "first_pid": first["pid"],
            "first_alive": proc.poll() is None,
            "config_before": config_before,
            "config_after": (run / ".hydra" / "config.yaml").read_text(),
            "second_marker": (tmp / "marker2.json").exists(),
        }
    finally:
        hold.unlink()
    seen = _wait_for_step(proc, marker, 2)
    os.kill(seen["pid"], signal.SIGTERM)  # train.py itself, not the shell
    out = proc.communicate(timeout=120)[0]
    return {
        "cmd": cmd,
        "run": run,
        "tmp": tmp,
        "seen": seen,
        "out": out,
        "returncode": proc.returncode,
        "carried_on": flag.exists(),
        "lock_left": (run / "run.lock").exists(),
        "in_use": in_use,
    }


def test_sigterm_saves_at_the_next_step_exits_143_and_resumes_exactly(assets, sigterm_run):
    """SIGTERM mid-run: a checkpoint at the next step boundary, exit 143 (so `train.py && next` stops), and the
    rerun resumes from it to the weights of an uninterrupted run."""
    run, cmd, seen, out = sigterm_run["run"], sigterm_run["cmd"], sigterm_run["seen"], sigterm_run["out"]
    assert sigterm_run["returncode"] == 143, out[-3000:]
    assert not sigterm_run["carried_on"] and "Traceback" not in out
    saved = _ckpt(run / "checkpoints" / "last.ckpt")
    step = saved["global_step"]
    assert seen["step"] <= step <= seen["step"] + 1 and step < 12, (seen, step)
    assert f"error: stopped by SIGTERM at step {step}: saved {run / 'checkpoints' / 'last.ckpt'}" in out
    # the rerun it names is the one that resumes (the default run folder is a new one per command)
    assert f"to resume, rerun with hydra.run.dir={run} (ckpt_path=last, the default)" in out
    assert not sigterm_run["lock_left"]

    again = subprocess.run(
        [*cmd, "+callbacks.marker.seconds=0"], env=_env(), capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout + again.stderr
    resumed = _ckpt(run / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == 12

    straight_args = [a for a in TRAIN_ARGS if "every_n_train_steps" not in a]
    _, straight = train(
        compose_train(sigterm_run["tmp"] / "straight", assets["manifest"], assets["proc"], straight_args)
    )
    a = straight["model"].state_dict()
    b = resumed["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), (k, (a[k] - b[k]).abs().max().item())


def test_ctrl_c_saves_at_the_next_step_and_exits_130(assets, tmp_path):
    """SIGINT to the whole process group, as a terminal sends it (the DataLoader worker included): the main process
    saves at the next step boundary and exits 130; the worker ignores the signal and ends with it."""
    run, marker = tmp_path / "run", tmp_path / "marker.json"
    proc = _popen(_train_cmd(assets, run, marker, "data.num_workers=1"), start_new_session=True)
    seen = _wait_for_step(proc, marker, 2)
    os.killpg(proc.pid, signal.SIGINT)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, out[-3000:]
    assert "Traceback" not in out and "stopped by SIGINT at step" in out
    step = _ckpt(run / "checkpoints" / "last.ckpt")["global_step"]
    assert seen["step"] <= step <= seen["step"] + 1, (seen, step)


def test_a_second_run_into_a_used_run_folder_is_refused_with_the_first_pid(sigterm_run):
    """A second train.py into the run folder of a running one (sigterm_run's, held after its first step) exits 2
    naming the first run's pid and lock file, and leaves the first run's config and run alone."""
    run, in_use = sigterm_run["run"], sigterm_run["in_use"]
    second = in_use["second"]
    assert second.returncode == 2, second.stderr[-3000:]
    last = second.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {run} is in use by another train.py (pid {in_use['first_pid']} on"), last
    assert str(run / "run.lock") in last
    assert in_use["config_after"] == in_use["config_before"]  # the first run's config, untouched
    assert not in_use["second_marker"]
    assert in_use["first_alive"]  # the first run was running all along, and then stopped by its SIGTERM
    assert sigterm_run["returncode"] == 143


def test_a_stale_lock_is_taken_over_with_a_warning(assets, tmp_path, caplog):
    """A lock left by a run that was killed (its process is gone) does not block the folder."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.lock").write_text(json.dumps({"pid": gone.pid, "host": "h", "since": "then"}))
    with caplog.at_level(logging.WARNING, logger="musicflamingo.training"):
        _, obj = train(compose_train(tmp_path, assets["manifest"], assets["proc"], ["debug=fast"]))
    assert obj["trainer"].global_step == 2
    assert f"taking over the lock of pid {gone.pid}" in caplog.text and "no longer running" in caplog.text
    assert not (run / "run.lock").exists()  # released at the end


# ---------------------------------------------------------------------------------------------- item 11
def _eval_args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "benchmark=synthetic",
        f"benchmark.root={tmp_path / 'no_bench'}",
        f"ckpt={tmp_path / 'no_ckpt'}",
        f"output_dir={tmp_path / 'out'}",
        *extra,
    ]


def test_eval_py_refuses_max_new_tokens_below_one_before_loading_anything(tmp_path, capsys):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "eval.py"), *_eval_args(tmp_path, "max_new_tokens=-5")],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "eval.py: error: max_new_tokens=-5: expected an integer >= 1, or null (null: the benchmark's)"
    )
    assert (
        not (tmp_path / "out" / "predictions.jsonl").exists() and not (tmp_path / "out" / "run.json").exists()
    )

    from musicflamingo.eval import evaluate
    from musicflamingo.eval.runner import build_predict_fn

    code, err = _cli(lambda: evaluate(_compose("eval", _eval_args(tmp_path, "max_new_tokens=0"))), capsys)
    assert code == 2 and err == [
        "error: max_new_tokens=0: expected an integer >= 1, or null (null: the benchmark's)"
    ]
    # limit=0 scored nothing and exited 0 with an empty results file
    code, err = _cli(lambda: evaluate(_compose("eval", _eval_args(tmp_path, "limit=0"))), capsys)
    assert code == 2 and err == ["error: limit=0: expected an integer >= 1, or null (null: every item)"]
    with pytest.raises(ValueError, match="max_new_tokens=0"):  # the model-side builder refuses it too
        build_predict_fn(
            {"ckpt": str(write_tiny_checkpoint(tmp_path / "ck")), "max_new_tokens": 0, "device": "cpu"}
        )


# ---------------------------------------------------------------------------------------------- run_cli
def _compose(name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def _raise_in_numpy() -> None:
    np.zeros(2).reshape(3)  # ValueError from inside numpy: a bug of ours, not bad input


def _raise_in_project() -> None:
    from musicflamingo.runtime import parse_dtype

    parse_dtype("float3")


def test_run_cli_keeps_the_traceback_of_a_bug(capsys):
    """Where an error comes from decides: a ValueError raised inside numpy (or a RuntimeError anywhere) is a bug and
    propagates; the same type raised by project code, or an OSError naming its file, is one line and exit 2."""
    with pytest.raises(ValueError, match="cannot reshape"):
        run_cli(_raise_in_numpy)
    with pytest.raises(RuntimeError):
        run_cli(lambda: torch.zeros(2) @ torch.zeros(3))
    code, err = _cli(_raise_in_project, capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: dtype='float3': expected one of"), err
    code, err = _cli(lambda: open("/nonexistent-dir/x.txt"), capsys)
    assert code == 2 and err == ["error: /nonexistent-dir/x.txt: No such file or directory"]


# ---------------------------------------------------------------------------------------------- weak kinds
def _infer_call(a: dict, tmp: Path, **settings: Any) -> Callable[[], Any]:
    from musicflamingo.inference import infer

    audio = write_audio(tmp / "x.wav", make_tone(440.0, 0.5))
    cfg = {"ckpt": str(a["ckpt"]), "audio": str(audio), "device": "cpu", "stream": False, **settings}
    return lambda: infer(cfg)


def _ckpt_with_config(a: dict, tmp: Path, edit: Callable[[dict], None]) -> Path:
    import shutil

    path = Path(shutil.copytree(a["ckpt"], tmp / "edited"))
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def _eos(value: Any) -> Callable[[dict], None]:
    return lambda cfg: cfg["text_config"].__setitem__("eos_token_id", value)


def _eval_call(tmp: Path, *overrides: str) -> Callable[[], Any]:
    from musicflamingo.eval import evaluate

    cfg = _compose("eval", _eval_args(tmp, *overrides))
    return lambda: evaluate(cfg)


def _train_call(a: dict, tmp: Path, *overrides: str) -> Callable[[], Any]:
    cfg = compose_train(tmp, a["manifest"], a["proc"], ["debug=fast", *overrides])
    return lambda: train(cfg)


def _other_architecture(a: dict, tmp: Path) -> tuple[Callable[[], Any], list[str]]:
    """A training checkpoint whose projector bias has another shape, given as ckpt_path."""
    train(compose_train(tmp / "first", a["manifest"], a["proc"], ["debug=fast"]))
    state = torch.load(tmp / "first" / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    key = "model.multi_modal_projector.linear_1.bias"
    state["state_dict"][key] = torch.zeros(7)
    other = tmp / "other.ckpt"
    torch.save(state, other)
    return _train_call(a, tmp / "second", f"ckpt_path={other}"), [f"ckpt_path={other}", key, "[7]"]


def _read_only_output(a: dict, tmp: Path, monkeypatch) -> tuple[Callable[[], Any], list[str]]:
    """The run folder's parent refuses writes (EROFS), as a read-only mount does (the tests may run as root, which
    chmod does not stop)."""
    real_mkdir = os.mkdir
    readonly = tmp / "readonly"

    def mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
        if Path(path).is_relative_to(readonly):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    cfg = compose_train(tmp, a["manifest"], a["proc"], ["debug=fast", f"paths.output_dir={readonly / 'run'}"])
    return (lambda: train(cfg)), [str(readonly / "run"), "Read-only file system"]


def _full_disk(a: dict, tmp: Path, monkeypatch) -> tuple[Callable[[], Any], list[str]]:
    """Every checkpoint write fails with ENOSPC (no file named in the OSError): the line names the checkpoint."""
    import musicflamingo.callbacks as callbacks

    def save(obj: Any, f: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(callbacks.torch, "save", save)
    return _train_call(a, tmp), [str(tmp / "run" / "checkpoints"), "No space left on device"]


WEAK: dict[str, Callable[..., tuple[Callable[[], Any], list[str]]]] = {
    "infer_device_mps": lambda a, t, m: (_infer_call(a, t, device="mps"), ["device='mps'", "not available"]),
    "infer_device_meta": lambda a, t, m: (_infer_call(a, t, device="meta"), ["device='meta'"]),
    "eval_device_meta": lambda a, t, m: (_eval_call(t, "device=meta"), ["device='meta'"]),
    "infer_temperature_1e-300": lambda a, t, m: (
        _infer_call(a, t, do_sample=True, temperature=1e-300),
        ["temperature", "1e-300"],
    ),
    "infer_temperature_inf": lambda a, t, m: (
        _infer_call(a, t, do_sample=True, temperature=float("inf")),
        ["temperature", "inf"],
    ),
    "infer_seed_abc": lambda a, t, m: (_infer_call(a, t, do_sample=True, seed="abc"), ["seed", "'abc'"]),
    "train_seed_abc": lambda a, t, m: (_train_call(a, t, "seed=abc"), ["seed='abc'"]),
    "eos_as_string": lambda a, t, m: (
        _infer_call({**a, "ckpt": _ckpt_with_config(a, t, _eos("299"))}, t),
        ["config.json", "text_config.eos_token_id", "'299'"],
    ),
    "eos_list_with_a_string": lambda a, t, m: (
        _infer_call({**a, "ckpt": _ckpt_with_config(a, t, _eos([299, "300"]))}, t),
        ["config.json", "text_config.eos_token_id[1]", "'300'"],
    ),
    "infer_batch_size_0": lambda a, t, m: (_infer_call(a, t, batch_size=0), ["batch_size=0"]),
    "eval_batch_size_0": lambda a, t, m: (_eval_call(t, "batch_size=0"), ["batch_size=0"]),
    "train_batch_max_tokens_0": lambda a, t, m: (
        _train_call(a, t, "data.batch_max_tokens=0"),
        ["data.batch_max_tokens=0"],
    ),
    "train_resume_other_architecture": lambda a, t, m: _other_architecture(a, t),
    "train_read_only_output_folder": _read_only_output,
    "train_full_disk_at_checkpoint": _full_disk,
}


@pytest.mark.parametrize("name", sorted(WEAK))
def test_weak_input_is_one_line_and_exit_2(name, assets, tmp_path, capsys, monkeypatch):
    """Each of these gave a traceback, a line naming nothing, or ran anyway: now exit 2 and one line naming the
    setting, file or key."""
    call, expected = WEAK[name](assets, tmp_path, monkeypatch)
    capsys.readouterr()
    code, err = _cli(call, capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    for part in expected:
        assert part in err[0], (part, err)


# ---------------------------------------------------------------------------------------------- skipped steps, DDP
# The two-process run (trainer=ddp, bad_sample_policy=skip, one sample a batch, an undecodable clip: the rank whose
# batch is all bad returns a zero loss connected to every weight instead of None, which DDP refuses; the bad-sample
# count over both ranks) is test_lit_review14.test_ddp_rank_whose_validation_batches_are_all_bad_joins_val_loss's:
# that run's training holds such a batch, and one launch checks both.


class _Strategy:
    def __init__(self, other_rank: torch.Tensor) -> None:
        self.other_rank = other_rank

    def reduce(self, flags: torch.Tensor, reduce_op: str) -> torch.Tensor:
        assert reduce_op == "sum"
        if flags.numel() != 2:  # the step's [loss sum, batches, label tokens]: this rank's alone
            return flags
        return flags + self.other_rank


class _Trainer:
    world_size = 2
    global_step = 0
    accumulate_grad_batches = 1

    def __init__(self, other_rank: torch.Tensor) -> None:
        self.strategy = _Strategy(other_rank)


def test_ddp_ranks_agree_to_skip_a_nonfinite_loss(monkeypatch):
    """Another rank's loss is NaN (flags [nonfinite, learned] summed over ranks): this rank, whose loss is finite,
    skips too, with a zero loss that reaches every trainable weight, and the optimizer step gets no gradient."""
    from musicflamingo.lit import MusicFlamingoLit
    from musicflamingo.model.build import create_model

    net = create_model("tiny", {"audio": {"max_source_positions": 100}}, seed=0)
    parts = {"audio_tower": None, "multi_modal_projector": None, "language_model": None}
    lit = MusicFlamingoLit(net, None, None, parts, "skip")
    monkeypatch.setattr(lit, "log", lambda *a, **k: None)
    lit._trainer = _Trainer(torch.tensor([1.0, 0.0]))
    ids = torch.randint(0, 200, (1, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    loss = lit.training_step(batch, 0)
    assert loss is not None and loss.item() == 0.0 and lit.nonfinite_steps == 1
    loss.backward()
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert all(p.grad is not None and not p.grad.any() for p in trainable)
    lit.on_before_optimizer_step(None)
    assert all(p.grad is None for p in trainable)
    # a step where the other rank learned keeps its gradients
    lit._trainer = _Trainer(torch.tensor([0.0, 1.0]))
    lit.training_step(batch, 1).backward()
    lit.on_before_optimizer_step(None)
    assert any(p.grad is not None and p.grad.any() for p in trainable)
