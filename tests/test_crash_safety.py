"""Crash safety with real SIGKILLs: training resumes to the same weights, checkpoint writes are all-or-nothing,
evaluation resumes without duplicates, and NaN/inf losses stop (keeping the last good checkpoint) or are skipped.

The kill tests run the entry points (or small writer scripts) with ``subprocess.Popen`` and ``os.kill(pid,
SIGKILL)`` at a point they observe from outside (a file appearing); no cleanup code of the victim runs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from tiny_assets import make_tone, write_audio
from tiny_checkpoint import write_tiny_checkpoint
from train_fixtures import TINY_OVERRIDES, compose_train, write_dataset, write_processor

from musicflamingo import MusicFlamingo, MusicFlamingoConfig
from musicflamingo.callbacks import AtomicCheckpointIO
from musicflamingo.checkpoint import CheckpointError, check_checkpoint_dir, recover_interrupted_save

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


class SlowSteps(Callback):
    """Sleeps after every training batch so that a kill from outside lands mid-run (weights are unaffected)."""

    def __init__(self, seconds: float = 0.2) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args: object) -> None:
        time.sleep(self.seconds)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("crash")
    return {"proc": write_processor(root / "proc"), "manifest": write_dataset(root / "data")}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]))
    return env


def _popen(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    """Start `python *args` with its output appended to `log` (kept for the failure message)."""
    with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [sys.executable, *args], cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=_env()
        )
    proc.log = log  # type: ignore[attr-defined]
    return proc


def _kill_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 120.0) -> None:
    """Poll `ready()` every few ms and SIGKILL the process as soon as it is true."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            tail = proc.log.read_text(errors="replace")[-3000:]  # type: ignore[attr-defined]
            raise AssertionError(f"kill point not reached (rc {proc.poll()}):\n{tail}")
        time.sleep(0.003)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def _load_ckpt(path: Path) -> dict:
    return AtomicCheckpointIO().load_checkpoint(path)


# ---------------------------------------------------------------------------------------------- (a) training
TRAIN_ARGS = [
    "trainer.max_steps=12",
    "model.scheduler.max_steps=12",  # the LR schedule length does not depend on where a run was cut
    "model.scheduler.warmup_steps=2",
    "callbacks.model_checkpoint.every_n_train_steps=2",
    "data.batch_max_tokens=800",
    "export=false",
    "threads=1",
]


def test_sigkill_during_training_then_rerun_gives_the_uninterrupted_weights(assets, tmp_path):
    run = tmp_path / "killed"
    cmd = [
        str(ROOT / "train.py"),
        f"data.train={assets['manifest']}",
        f"data.processor={assets['proc']}",
        f"+model.net.overrides={TINY_OVERRIDES}",
        f"hydra.run.dir={run}",
        f"paths.log_dir={tmp_path / 'logs'}",
        "trainer.enable_progress_bar=false",
        "+callbacks.slow._target_=test_crash_safety.SlowSteps",
        "+callbacks.slow.seconds=0.2",
        *TRAIN_ARGS,
    ]
    last = run / "checkpoints" / "last.ckpt"
    log = tmp_path / "train.log"
    _kill_when(_popen(cmd, tmp_path, log), last.is_file)
    at_kill = _load_ckpt(last)["global_step"]
    assert 2 <= at_kill < 12, at_kill

    # the same command, its steps no longer slowed (the sleep only gives the kill its moment; 2 s of a rerun)
    rerun = [a if a != "+callbacks.slow.seconds=0.2" else "+callbacks.slow.seconds=0" for a in cmd]
    done = subprocess.run([sys.executable, *rerun], cwd=tmp_path, env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stdout + done.stderr
    resumed = _load_ckpt(last)
    assert resumed["global_step"] == 12

    from musicflamingo.training import train  # the same run without interruption, in this process

    train(compose_train(tmp_path / "straight", assets["manifest"], assets["proc"], TRAIN_ARGS))
    straight = _load_ckpt(tmp_path / "straight" / "run" / "checkpoints" / "last.ckpt")
    assert straight["global_step"] == 12
    a, b = straight["state_dict"], resumed["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), (k, (a[k] - b[k]).abs().max().item())


# ---------------------------------------------------------------------------------------------- (b) writes
TORCH_WRITER = """
import sys, torch
from musicflamingo.checkpoint import atomic_torch_save
path, n = sys.argv[1], int(sys.argv[2])
for v in range(1, 1000):
    atomic_torch_save({"version": v, "w": torch.full((n,), float(v))}, path)
    print(v, flush=True)
"""

PRETRAINED_WRITER = """
import sys, torch
from musicflamingo import MusicFlamingo, MusicFlamingoConfig
path = sys.argv[1]
text = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8)
model = MusicFlamingo(MusicFlamingoConfig.from_name("tiny", text=text))
for v in range(1, 1000):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(v))
    model.save_pretrained(path)
    if v == 1:
        open(path + "/tokenizer.json", "w").write("{}")  # a file that is not weights: must be carried over
    print(v, flush=True)
"""


def _mid_write(folder: Path, prefix: str) -> Callable[[], bool]:
    """True once the first version is complete and a later one is being written (a non-empty temp entry)."""

    def ready() -> bool:
        try:
            for p in folder.glob(prefix + "*"):
                files = [p] if p.is_file() else list(p.iterdir()) if p.is_dir() else []
                if any(f.stat().st_size > 0 for f in files):
                    return True
        except OSError:  # the entry was renamed or removed while looking
            pass
        return False

    return ready


def _kill_mid_write(
    script: str, target: Path, prefix: str, extra: list[str], where: Path | None = None
) -> bool:
    """Run a writer loop, kill it while a temp entry (named `prefix`*, in `where`, default: next to `target`) is
    being written; True if that temp entry survived (the kill really landed mid-write, before the rename)."""
    where = target.parent if where is None else where
    log = target.parent / "writer.log"
    proc = _popen(["-c", script, str(target), *extra], target.parent, log)
    mid_write = _mid_write(where, prefix)
    _kill_when(proc, lambda: log.read_bytes().startswith(b"1\n") and mid_write())
    return any(where.glob(prefix + "*"))


@pytest.mark.parametrize("attempt", range(2))
def test_sigkill_during_atomic_torch_save_leaves_a_complete_file(tmp_path, attempt):
    target = tmp_path / "last.ckpt"
    n = 4_000_000  # 16 MB: long enough a write to be caught in the middle
    torn = _kill_mid_write(TORCH_WRITER, target, ".last.ckpt.", [str(n)])
    printed = [int(x) for x in (tmp_path / "writer.log").read_text().split()]
    ckpt = torch.load(target, weights_only=True)
    v = ckpt["version"]
    assert v in (printed[-1], printed[-1] + 1)  # the last finished version, or the one renamed just before
    assert ckpt["w"].shape == (n,) and bool((ckpt["w"] == v).all())
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "last.ckpt",
        "writer.log",
    ]
    if not torn:
        pytest.skip("the kill landed between writes this time (file still verified complete)")
    partial = [p.stat().st_size for p in tmp_path.glob(".last.ckpt.*")]
    assert partial and max(partial) < target.stat().st_size  # what the kill cut short never reached the path


def test_sigkill_during_save_pretrained_leaves_a_complete_folder(tmp_path):
    """The files are written in a staging folder inside the target and moved in after a COMMIT file: a kill
    before it leaves the old version in place; one in the short commit phase, the new version once finished."""
    target = tmp_path / "export"
    torn = _kill_mid_write(PRETRAINED_WRITER, target, ".save-", [], where=target)
    printed = [int(x) for x in (tmp_path / "writer.log").read_text().split()]
    try:
        model = MusicFlamingo.from_pretrained(target)
    except CheckpointError as e:  # killed after the commit: readers refuse the half-moved folder
        assert "holds the rest of its files" in str(e)
        recover_interrupted_save(target)
        model = MusicFlamingo.from_pretrained(target)
    v = float(next(model.parameters()).detach().flatten()[0])
    assert all(bool((p == v).all()) for p in model.parameters())  # one complete version, no mix
    assert v in (printed[-1], printed[-1] + 1)
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in target.iterdir()
    }
    if not torn:
        pytest.skip("the kill landed between writes this time (folder still verified complete)")


KILL_MID_COMMIT = """
import os, signal, sys, torch
import musicflamingo.checkpoint as ck
from musicflamingo import MusicFlamingo, MusicFlamingoConfig
path = sys.argv[1]
model = MusicFlamingo(MusicFlamingoConfig.from_name("tiny"))
with torch.no_grad():
    for p in model.parameters():
        p.fill_(1.0)
model.save_pretrained(path)
open(os.path.join(path, "notes.txt"), "w").write("mine")
with torch.no_grad():
    for p in model.parameters():
        p.fill_(2.0)
real = os.replace
def replace(src, dst):
    if os.path.basename(dst) == "generation_config.json":  # new config.json in, old weights: the worst moment
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
ck.os.replace = replace
model.save_pretrained(path)
"""


def _tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def killed_mid_commit(tmp_path_factory) -> Path:
    """The folder a save_pretrained killed mid-commit left (KILL_MID_COMMIT, one process for the tests below;
    each works on its own copy)."""
    tmp = tmp_path_factory.mktemp("mid_commit")
    target = tmp / "export"
    proc = _popen(["-c", KILL_MID_COMMIT, str(target)], tmp, tmp / "writer.log")
    assert proc.wait(timeout=120) == -signal.SIGKILL
    return target


def _kill_mid_commit(killed: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the `killed_mid_commit` folder in `tmp_path`: (the folder, its staging folder)."""
    target = Path(shutil.copytree(killed, tmp_path / "export", symlinks=True))
    (staging,) = target.glob(".save-*")
    assert (staging / "COMMIT").is_file() and (staging / "model.safetensors").is_file()
    return target, staging


def test_sigkill_mid_commit_is_refused_by_readers_and_finished_by_recover(killed_mid_commit, tmp_path):
    """Killed after the commit, between two moves (new config.json, old weights): reading names the staging
    folder and changes nothing; `recover_interrupted_save` (which every save runs first) moves the rest in."""
    target, staging = _kill_mid_commit(killed_mid_commit, tmp_path)
    before = _tree(target)
    with pytest.raises(
        CheckpointError, match=rf"{staging.name} holds the rest of its files.*recover_interrupted"
    ):
        MusicFlamingo.from_pretrained(target)
    with pytest.raises(CheckpointError, match="was interrupted"):
        check_checkpoint_dir(target, need_tokenizer=False)
    assert _tree(target) == before  # reading left it as it was
    recover_interrupted_save(target)
    model = MusicFlamingo.from_pretrained(target)
    assert all(bool((p == 2.0).all()) for p in model.parameters())  # the committed version, complete
    assert not list(target.glob(".save-*")) and (target / "notes.txt").read_text() == "mine"
    model.save_pretrained(target)  # and saving over it works again
    assert MusicFlamingo.from_pretrained(target) is not None


def test_save_after_a_sigkill_mid_commit_finishes_it_then_replaces(killed_mid_commit, tmp_path):
    target, staging = _kill_mid_commit(killed_mid_commit, tmp_path)
    (target / "tokenizer.json").write_text("{}")  # files of the folder that are not the model's
    (target / "src").mkdir()
    (target / "src" / "main.py").write_text("1")
    model = MusicFlamingo(MusicFlamingoConfig.from_name("tiny"))
    model.save_pretrained(target)
    assert not staging.exists()
    assert (target / "tokenizer.json").read_text() == "{}" and (target / "src" / "main.py").read_text() == "1"
    assert (target / "notes.txt").read_text() == "mine"
    back = MusicFlamingo.from_pretrained(target)
    assert torch.equal(back.lm_head.weight, model.lm_head.weight)


# ---------------------------------------------------------------------------------------------- (c) eval
def test_sigkill_during_eval_then_rerun_predicts_each_item_once(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt")
    bench = tmp_path / "bench"
    n = 30
    recs = []
    for i in range(n):
        wav = write_audio(bench / f"{i}.wav", make_tone(220.0 + 10 * i, 0.4))
        conv = [
            {"role": "user", "content": "<sound>Describe it."},
            {"role": "assistant", "content": "A tone."},
        ]
        recs.append({"id": f"c{i}", "task": "caption", "audio": wav.name, "conversations": conv})
    (bench / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "out"
    cmd = [
        str(ROOT / "eval.py"),
        "benchmark=synthetic",
        f"benchmark.root={bench}",
        f"ckpt={ckpt}",
        f"output_dir={out}",
        "batch_size=1",
        "max_new_tokens=6",
        "device=cpu",
        "dtype=float32",
        "progress=false",
    ]
    preds = out / "predictions.jsonl"

    def some_done() -> bool:
        return preds.is_file() and preds.read_bytes().count(b"\n") >= 3

    _kill_when(_popen(cmd, tmp_path, tmp_path / "eval.log"), some_done)
    done_at_kill = preds.read_bytes().count(b"\n")
    assert done_at_kill < n and not (out / "results.json").exists(), "the kill did not land mid-run"

    again = subprocess.run([sys.executable, *cmd], cwd=tmp_path, env=_env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    ids = [json.loads(line)["id"] for line in preds.read_text().splitlines()]
    assert sorted(ids) == sorted(f"c{i}" for i in range(n)) and len(ids) == n  # each exactly once
    assert json.loads((out / "results.json").read_text())["num_scored"] == n


# ---------------------------------------------------------------------------------------------- (d) NaN loss
def _nan_at(monkeypatch, batch: int) -> dict[str, int]:
    """Make the model's training loss NaN on the `batch`-th training forward (1-based)."""
    calls = {"n": 0}
    forward = MusicFlamingo.forward

    def patched(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training and kwargs.get("labels") is not None:
            calls["n"] += 1
            if calls["n"] == batch:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MusicFlamingo, "forward", patched)
    return calls


NAN_ARGS = [
    "trainer.max_steps=6",
    "callbacks.model_checkpoint.every_n_train_steps=1",
    "export=false",
    "threads=1",
]


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(
    assets, tmp_path, monkeypatch
):
    from musicflamingo.lit import NonFiniteLossError
    from musicflamingo.training import train

    _nan_at(monkeypatch, 4)
    cfg = compose_train(tmp_path, assets["manifest"], assets["proc"], NAN_ARGS)
    with pytest.raises(NonFiniteLossError) as info:
        train(cfg)
    msg = str(info.value)
    assert "loss is nan at global step 3" in msg and "model.nonfinite_loss=skip" in msg
    last = _load_ckpt(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 3
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values() if t.is_floating_point())


def test_nan_loss_skip_policy_continues_to_the_end(assets, tmp_path, monkeypatch, caplog):
    from musicflamingo.training import train

    calls = _nan_at(monkeypatch, 4)
    cfg = compose_train(
        tmp_path, assets["manifest"], assets["proc"], [*NAN_ARGS, "model.nonfinite_loss=skip"]
    )
    with caplog.at_level("WARNING"):
        _, obj = train(cfg)
    assert obj["trainer"].global_step == 6 and calls["n"] == 6
    assert obj["model"].nonfinite_steps == 1
    assert "step skipped (1 so far)" in caplog.text
    weights = obj["model"].model.state_dict().values()
    assert all(torch.isfinite(t).all() for t in weights if t.is_floating_point())


def test_run_stops_print_one_line(capsys):
    from musicflamingo.cli import run_cli
    from musicflamingo.data.dataset import TooManyBadSamplesError
    from musicflamingo.lit import NonFiniteLossError

    for err in (
        NonFiniteLossError("loss is nan at global step 3; stopping"),
        TooManyBadSamplesError("3 of 9"),
    ):

        def fail(e=err):
            raise e

        with pytest.raises(SystemExit) as info:
            run_cli(fail)
        assert info.value.code == 2
        assert capsys.readouterr().err == f"error: {err}\n"


def test_a_process_exits_with_a_loader_iterator_still_alive(tmp_path):
    """Our DataLoader workers ignore SIGTERM (a Ctrl-C / group SIGTERM stops the run at a step's end, not a worker
    mid-batch). A loader iterator still referenced at exit then made the interpreter wait for its workers forever:
    multiprocessing's exit handler only sends SIGTERM. The process must end, and end cleanly."""
    script = tmp_path / "leak.py"
    script.write_text(
        "import functools\n"
        "from torch.utils.data import DataLoader\n"
        "from musicflamingo.data.datamodule import init_worker\n"
        "loader = DataLoader(list(range(8)), batch_size=2, num_workers=1, persistent_workers=True,\n"
        "                    worker_init_fn=functools.partial(init_worker, rank=0))\n"
        "KEEP = iter(loader)\n"
        "print(next(KEEP).tolist(), flush=True)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    try:
        done = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the process did not exit: its DataLoader worker outlived it")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[0, 1]" and "Error" not in done.stderr, (done.stdout, done.stderr)
