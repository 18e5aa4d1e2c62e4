"""Review round 9, "killed at any moment": SIGKILL (the OOM killer, a preemption) at points observed from outside
(a file appearing, a row written), then the documented rerun, whose outputs must equal an uninterrupted run's.

The fast tests cover the checkpoint temp files a killed save leaves (the rerun removes them) and `infer.py output=`;
the sweep over training (first step, mid-checkpoint, export), eval (mid-prediction, mid-report), the index builder
and the shard writer is marked slow (each case runs the entry point two or three times).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tiny_assets import make_tone, write_audio
from tiny_checkpoint import write_tiny_checkpoint
from train_fixtures import TINY_OVERRIDES, compose_train, write_dataset, write_processor

from musicflamingo.callbacks import AtomicCheckpointIO

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]))
    return env


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *args], cwd=cwd, env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done


def _kill_when(
    args: list[str], cwd: Path, ready: Callable[[], bool], timeout: float = 180.0, may_end: bool = False
) -> bool:
    """Start `python *args`, poll `ready()` every millisecond or so, SIGKILL the process as soon as it is true;
    True if killed. `may_end`: a process that ends with status 0 first is no failure (False)."""
    log = cwd / "killed.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, *args], cwd=cwd, env=_env(), stdout=out, stderr=out)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ready():
                break
        except OSError:  # an entry renamed or removed while looking
            pass
        if may_end and proc.poll() == 0:
            return False
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"kill point not reached (rc {proc.poll()}):\n{log.read_text()[-3000:]}")
        time.sleep(0.001)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    return True


def _names(folder: Path, pred: Callable[[str], bool]) -> list[str]:
    try:
        return [n for n in os.listdir(folder) if pred(n)]
    except FileNotFoundError:
        return []


def _temps(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.tmp"))


# ------------------------------------------------------------------------------------------- checkpoint temps
WRITER = """
import sys, torch
from musicflamingo.checkpoint import atomic_torch_save
for v in range(1, 1000):
    atomic_torch_save({"w": torch.full((int(sys.argv[2]),), float(v))}, sys.argv[1])
"""


def test_a_checkpoint_save_killed_midway_leaves_a_temp_file_that_the_rerun_removes(tmp_path):
    """A preemption while `last.ckpt` is saved left `.last.ckpt.<random>.tmp` (as big as a checkpoint: weights and
    optimizer states) in the run folder for good; a job preempted while saving again and again filled the disk.
    The rerun, which holds the run folder's lock, removes it."""
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    ckpts.mkdir(parents=True)

    def mid_first_write() -> bool:  # the first save's temp file is being written, no last.ckpt yet
        return any((ckpts / n).stat().st_size > 0 for n in _names(ckpts, lambda n: n.endswith(".tmp")))

    _kill_when(["-c", WRITER, str(ckpts / "last.ckpt"), str(4_000_000)], tmp_path, mid_first_write)
    left = _temps(ckpts)
    assert left and not (ckpts / "last.ckpt").exists(), "the kill did not land mid-write"
    (run / ".bad_samples.jsonl.abcd1234.tmp").write_text('{"id": ')  # a killed report rewrite (replace_file)
    mine = run / "notes.tmp"  # a user's file: not ours, stays
    mine.write_text("x")

    from musicflamingo.training import train

    assets = tmp_path / "assets"
    cfg = compose_train(
        tmp_path,
        write_dataset(assets / "data"),
        write_processor(assets / "proc"),
        ["trainer.max_steps=1", "export=false", "threads=1"],
    )
    _, obj = train(cfg)  # a fresh start (no last.ckpt) in the folder
    assert obj["trainer"].global_step == 1
    assert _temps(run) == ["notes.tmp"], _temps(run)
    assert AtomicCheckpointIO().load_checkpoint(ckpts / "last.ckpt")["global_step"] == 1


# ------------------------------------------------------------------------------------------- infer.py output=
def test_infer_killed_after_some_answers_then_rerun_answers_each_file_once_as_uninterrupted(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt")
    music = tmp_path / "music"
    for i in range(7):
        write_audio(music / f"s{i}.wav", make_tone(200.0 + 30 * i, 0.5 + 0.1 * (i % 4)))

    def cmd(out: Path) -> list[str]:
        return [
            str(ROOT / "infer.py"),
            f"ckpt={ckpt}",
            f"audio={music}",
            f"output={out}",
            "max_new_tokens=6",
            "batch_size=3",
            "do_sample=true",  # each input its own (seed, i) stream: a resumed run must keep them
            "seed=3",
            "device=cpu",
            "dtype=float32",
            "stream=false",
            "threads=1",  # as OMP_NUM_THREADS=1 gives the entry point's processes; this one's set back below
        ]

    # the uninterrupted run in this process (the function infer.py wraps, the same overrides): one start fewer
    from hydra import compose, initialize_config_dir

    from musicflamingo.inference import infer

    straight = tmp_path / "straight.jsonl"
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("infer", overrides=cmd(straight)[1:])
    threads = torch.get_num_threads()
    try:
        infer(cfg, out=io.StringIO())
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "answers.jsonl"
    _kill_when(cmd(out), tmp_path, lambda: out.is_file() and out.read_bytes().count(b"\n") >= 2)
    at_kill = out.read_bytes().count(b"\n")
    assert at_kill < 7, "the kill did not land mid-run"
    _run(cmd(out), tmp_path)
    rows = out.read_text().splitlines()
    assert sorted(rows) == sorted(straight.read_text().splitlines())
    assert len({json.loads(r)["audio"] for r in rows}) == len(rows) == 7


# ------------------------------------------------------------------------------------------- slow sweep
TRAIN_ARGS = [
    "trainer.max_steps=8",
    "model.scheduler.max_steps=8",
    "model.scheduler.warmup_steps=2",
    "callbacks.model_checkpoint.every_n_train_steps=2",
    "data.batch_max_tokens=800",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "threads=1",
]


@pytest.fixture(scope="module")
def train_setup(tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("kill_train")
    proc, manifest = write_processor(root / "proc"), write_dataset(root / "data")

    def cmd(run: Path) -> list[str]:
        return [
            str(ROOT / "train.py"),
            f"data.train={manifest}",
            f"data.processor={proc}",
            f"+model.net.overrides={TINY_OVERRIDES}",
            f"hydra.run.dir={run}",
            f"paths.log_dir={run / 'logs'}",
            *TRAIN_ARGS,
        ]

    _run(cmd(root / "straight"), root)
    return {"root": root, "cmd": cmd, "straight": _outputs(root / "straight")}


def _outputs(run: Path) -> dict[str, object]:
    from safetensors.torch import load_file

    ckpt = AtomicCheckpointIO().load_checkpoint(run / "checkpoints" / "last.ckpt")
    with open(run / "csv" / "metrics.csv", newline="") as f:
        rows = [(r["step"], r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    return {
        "step": ckpt["global_step"],
        "weights": ckpt["state_dict"],
        "export": load_file(str(run / "export" / "model.safetensors")),
        "rows": rows,
    }


def _checkpoint_temp(run: Path) -> bool:
    return bool(_names(run / "checkpoints", lambda n: n.endswith(".tmp")))


TRAIN_POINTS: dict[str, Callable[[Path], bool]] = {
    # the second save (last.ckpt of step 2 is there): the rerun resumes from a checkpoint
    "mid-checkpoint": lambda r: (r / "checkpoints" / "last.ckpt").is_file() and _checkpoint_temp(r),
    "final-step-saved": lambda r: (r / "checkpoints" / "step_000008.ckpt").is_file(),
    "mid-export": lambda r: bool(_names(r / "export", lambda n: n.startswith(".save-"))),
}


@pytest.mark.slow
@pytest.mark.parametrize("point", list(TRAIN_POINTS))
def test_train_killed_then_rerun_equals_the_uninterrupted_run(train_setup, point):
    root, cmd, straight = train_setup["root"], train_setup["cmd"], train_setup["straight"]
    run = root / point
    _kill_when(cmd(run), root, lambda: TRAIN_POINTS[point](run))
    _run(cmd(run), root)
    got = _outputs(run)
    assert got["step"] == straight["step"] == 8
    for k, v in straight["weights"].items():
        assert torch.allclose(got["weights"][k], v, atol=1e-6, rtol=0), k
    for k, v in straight["export"].items():
        assert torch.allclose(got["export"][k], v, atol=1e-6, rtol=0), k
    assert got["rows"] == straight["rows"]  # each step's metrics once, the same numbers
    assert _temps(run) == [] and not (run / "run.lock").exists()


@pytest.mark.slow
def test_train_killed_before_its_first_checkpoint_then_rerun_logs_each_step_once(train_setup):
    root, cmd, straight = train_setup["root"], train_setup["cmd"], train_setup["straight"]
    run = root / "first-step"
    metrics = run / "csv" / "metrics.csv"
    _kill_when(cmd(run), root, lambda: metrics.is_file() and metrics.read_bytes().count(b"\n") >= 2)
    assert not (run / "checkpoints" / "last.ckpt").exists()
    _run(cmd(run), root)
    assert _outputs(run)["rows"] == straight["rows"]


def _eval_bench(root: Path) -> tuple[Path, Path]:
    ckpt = write_tiny_checkpoint(root / "ckpt")
    bench = root / "bench"
    recs = []
    for i in range(10):
        wav = write_audio(bench / f"{i}.wav", make_tone(220.0 + 10 * i, 0.4 + 0.1 * (i % 3)))
        conv = [
            {"role": "user", "content": "<sound>Describe it."},
            {"role": "assistant", "content": "A tone."},
        ]
        recs.append({"id": f"c{i}", "task": "caption", "audio": wav.name, "conversations": conv})
    (bench / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return ckpt, bench


EVAL_POINTS: dict[str, Callable[[Path], bool]] = {
    "first-batch": lambda o: (
        (o / "predictions.jsonl").is_file() and (o / "predictions.jsonl").stat().st_size > 0
    ),
    "mid-report": lambda o: (o / "per_item.jsonl").is_file(),
    "between-results-files": lambda o: (o / "results.json").is_file(),
}


@pytest.mark.slow
def test_eval_killed_at_several_points_then_rerun_gives_the_uninterrupted_results(tmp_path):
    ckpt, bench = _eval_bench(tmp_path)

    def cmd(out: Path) -> list[str]:
        return [
            str(ROOT / "eval.py"),
            "benchmark=synthetic",
            f"benchmark.root={bench}",
            f"ckpt={ckpt}",
            f"output_dir={out}",
            "batch_size=3",
            "max_new_tokens=6",
            "device=cpu",
            "dtype=float32",
            "progress=false",
        ]

    def results(out: Path) -> tuple[dict, str, list[str]]:
        res = json.loads((out / "results.json").read_text())
        res.pop("files")
        ids = [json.loads(line)["id"] for line in (out / "predictions.jsonl").read_text().splitlines()]
        return res, (out / "per_item.jsonl").read_text(), sorted(ids)

    _run(cmd(tmp_path / "straight"), tmp_path)
    straight = results(tmp_path / "straight")
    assert straight[2] == sorted(f"c{i}" for i in range(10))
    for point, ready in EVAL_POINTS.items():
        out = tmp_path / point
        _kill_when(cmd(out), tmp_path, lambda out=out, ready=ready: ready(out))
        _run(cmd(out), tmp_path)
        assert results(out) == straight, point  # every item once, the same numbers


def _index_manifest(folder: Path, audio: list[Path], copies: int) -> Path:
    recs = [
        {
            "id": f"c{k}_{i}",
            "audio": str(a),
            "conversations": [
                {"role": "user", "content": "<sound>What is this?"},
                {"role": "assistant", "content": "a tone" * (1 + i % 3)},
            ],
        }
        for k in range(copies)
        for i, a in enumerate(audio)
    ]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    "share", [0.3, 0.6, 0.9]
)  # of the uninterrupted run's time: loading, building, writing
def test_index_build_killed_then_rerun_writes_the_uninterrupted_index(tmp_path, share):
    import pyarrow.parquet as pq

    proc = write_processor(tmp_path / "proc")
    audio = [write_audio(tmp_path / "a" / f"{i}.wav", make_tone(100.0 + i, 1.0)) for i in range(50)]

    def cmd(m: Path) -> list[str]:
        return ["-m", "musicflamingo.data", "index", str(m), "--processor", str(proc), "--workers", "2"]

    straight = _index_manifest(tmp_path / "straight", audio, 40)
    start = time.monotonic()
    _run(cmd(straight), tmp_path)
    delay = share * (time.monotonic() - start)
    killed = _index_manifest(tmp_path / "killed", audio, 40)
    start = time.monotonic()
    was_killed = _kill_when(
        cmd(killed), tmp_path, lambda: time.monotonic() - start > delay, may_end=share > 0.5
    )
    assert was_killed or share > 0.5
    _run(cmd(killed), tmp_path)
    a = pq.read_table(f"{straight}.index.parquet")
    b = pq.read_table(f"{killed}.index.parquet")
    assert a.to_pydict() == b.to_pydict() and a.schema.metadata == b.schema.metadata
    assert sorted(os.listdir(killed.parent)) == ["m.jsonl", "m.jsonl.index.parquet"]


@pytest.mark.slow
@pytest.mark.parametrize("point", ["audio-chunks", "records-chunks"])
def test_shard_write_killed_then_rerun_writes_the_uninterrupted_set(tmp_path, point):
    audio = [write_audio(tmp_path / "a" / f"{i}.wav", make_tone(100.0 + i, 1.0)) for i in range(120)]
    manifest = _index_manifest(tmp_path / "m", audio, 1)

    def cmd(out: Path, *extra: str) -> list[str]:
        shard = ["-m", "musicflamingo.data", "shard", str(manifest), str(out)]
        return [*shard, "--workers", "2", "--chunk-bytes", "20000", *extra]

    def digest(d: Path) -> dict[str, str]:
        return {
            str(p.relative_to(d)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*"))
            if p.is_file() and (p.suffix == ".bin" or p.name == "index.json")
        }

    _run(cmd(tmp_path / "straight"), tmp_path)
    out = tmp_path / "killed"
    where = out if point == "audio-chunks" else out / "records"
    _kill_when(cmd(out), tmp_path, lambda: bool(_names(where, lambda n: n.endswith(".bin"))))
    again = subprocess.run(
        [sys.executable, *cmd(out)], cwd=tmp_path, env=_env(), capture_output=True, text=True
    )
    if again.returncode:  # a set left incomplete is refused, naming the documented way out
        assert again.returncode == 2 and "--overwrite" in again.stderr, again.stderr[-2000:]
        _run(cmd(out, "--overwrite"), tmp_path)
    straight, got = digest(tmp_path / "straight"), digest(out)
    for name in ("index.json", "records/index.json"):  # litdata records the time of writing
        a, b = (json.loads((d / name).read_text()) for d in (tmp_path / "straight", out))
        assert a["chunks"] == b["chunks"] and a["config"] == b["config"], name
        straight.pop(name), got.pop(name)
    assert got == straight


def test_a_fresh_start_over_a_killed_runs_metrics_keeps_no_old_step(tmp_path):
    """The fast half of the test above: Lightning logs the first step as the integer 0, which `_step` read as
    "no step" (`0 or ""`), so a fresh start over metrics.csv of a run killed before its first checkpoint kept
    every old row and logged step 0 twice."""
    import csv

    from musicflamingo.loggers import ContinuedExperimentWriter

    (tmp_path / "metrics.csv").write_text("step,train/loss\n0,9.0\n1,8.0\n2,7.0\n")
    writer = ContinuedExperimentWriter(log_dir=str(tmp_path))
    writer.log_metrics({"train/loss": 5.0}, step=0)
    writer.save()
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [(r["step"], r["train/loss"]) for r in rows] == [("0", "5.0")]
