"""Review round 10, "eval at scale": a long eval in a shared queue that kills jobs, several eval.py pointed at one
output folder by mistake, a benchmark of ~10,000 items, progress in a job log.

Killed runs and a second run are real processes (`evaluate(cfg, predict_fn)` with a stand-in model in a child
Python); the scale properties count calls and bytes, never wall time.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from musicflamingo.eval import EvalItem, runner
from musicflamingo.eval.runner import EvalConfigError, evaluate, predict_items, run_benchmark

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
CHOICES = ["piano", "guitar", "drums", "violin"]


def _bench(root: Path, n: int = 12, captions: bool = False) -> Path:
    """A synthetic benchmark of `n` MCQ items (every third a caption with `captions`) over two tiny audio files."""
    from tiny_assets import make_tone, write_audio

    root.mkdir(parents=True, exist_ok=True)
    for k in range(2):
        write_audio(root / f"a{k}.wav", make_tone(220.0 + 40 * k, 0.1))
    recs = []
    for i in range(n):
        if captions and i % 3 == 2:
            conv = [
                {"role": "user", "content": "<sound>Describe it."},
                {"role": "assistant", "content": f"A calm piano tone number {i % 5}."},
            ]
            recs.append({"id": f"c{i}", "task": "caption", "audio": f"a{i % 2}.wav", "conversations": conv})
        else:
            recs.append(
                {
                    "id": f"m{i}",
                    "task": "mcq",
                    "question_type": f"q{i % 3}",
                    "choices": CHOICES,
                    "answer": CHOICES[i % 4],
                    "audio": f"a{i % 2}.wav",
                    "conversations": [{"role": "user", "content": "<sound>Which instrument?"}],
                }
            )
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return root


def _overrides(bench: Path, out: Path, *extra: str) -> list[str]:
    return [
        "benchmark=synthetic",
        f"benchmark.root={bench}",
        f"output_dir={out}",
        "progress=false",
        "batch_size=2",
        *extra,
    ]


def _cfg(bench: Path, out: Path, *extra: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(config_name="eval", overrides=_overrides(bench, out, *extra))


def _answer(it: EvalItem) -> str:
    """A stand-in model: deterministic per item, right on some, wrong on others."""
    n = int(it.id[1:])
    return f"({'ABCD'[n % 3]})" if it.task == "mcq" else ["a calm piano tone", "loud drums"][n % 2]


class Predictor:
    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, batch: list[EvalItem]) -> list[str]:
        self.seen += [it.id for it in batch]
        return [_answer(it) for it in batch]


# A child process: evaluate() with the stand-in model. KILL_AT=<file name>: SIGKILL itself right before that
# file's finished write is renamed into place (its temporary file written whole); KILL_AFTER_BATCHES=<n>: after
# n batches; WAIT_FOR=<path>: in batch WAIT_AT (0: the first), write <path>.started and wait until <path> exists.
# Run as eval.py runs evaluate(): through cli.run_cli (one line and an exit status for a deliberate stop).
CHILD = r"""
import json, os, signal, sys, time
from pathlib import Path
from hydra import compose, initialize_config_dir
from musicflamingo.cli import run_cli
from musicflamingo.eval.runner import evaluate
from test_eval_review10 import _answer, _overrides

kill_at, kill_after = os.environ.get("KILL_AT"), int(os.environ.get("KILL_AFTER_BATCHES", "0"))
wait_for, wait_at = os.environ.get("WAIT_FOR"), int(os.environ.get("WAIT_AT", "0"))
if kill_at:
    real_replace = os.replace
    def replace(src, dst, *a, **k):
        if Path(dst).name == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst, *a, **k)
    os.replace = replace
batches = 0
def predict(batch):
    global batches
    if wait_for and batches == wait_at:
        Path(wait_for + ".started").write_text("")
        while not Path(wait_for).exists():
            time.sleep(0.02)
    batches += 1
    if kill_after and batches > kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
    return [_answer(it) for it in batch]
with initialize_config_dir(config_dir=sys.argv[1], version_base="1.3"):
    cfg = compose(config_name="eval", overrides=_overrides(Path(sys.argv[2]), Path(sys.argv[3]), *sys.argv[4:]))
run_cli(lambda: evaluate(cfg, predict), prefix="eval.py: error")
"""


def _child(bench: Path, out: Path, *extra: str, **env: str) -> subprocess.Popen:
    e = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    e.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]), **env)
    args = [sys.executable, "-c", CHILD, str(ROOT / "configs"), str(bench), str(out), *extra]
    return subprocess.Popen(
        args, cwd=out.parent, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _outputs(out: Path) -> tuple[dict, str, str, list[str]]:
    res = json.loads((out / "results.json").read_text())
    res.pop("files")
    ids = [json.loads(line)["id"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    return res, (out / "per_item.jsonl").read_text(), (out / "results.md").read_text(), sorted(ids)


def _left_over(out: Path) -> list[str]:
    """Temporary files and the lock: nothing of the kind may stay once a run has ended."""
    return sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp") or p.name == "eval.lock")


KILL_POINTS = {
    "mid-prediction": {"KILL_AFTER_BATCHES": "3"},
    "mid-plots": {"KILL_AT": "accuracy_by_question_type.png"},
    "mid-results": {"KILL_AT": "results.json"},
}


def test_eval_killed_then_rerun_keeps_predictions_removes_temp_files_and_equals_the_straight_run(tmp_path):
    bench = _bench(tmp_path / "bench")
    children = {
        point: _child(bench, tmp_path / point, **env) for point, env in KILL_POINTS.items()
    }  # at once
    straight = tmp_path / "straight"
    evaluate(_cfg(bench, straight), Predictor())
    assert _left_over(straight) == []
    for point, proc in children.items():
        log = proc.communicate(timeout=120)[0]
        assert proc.returncode == -signal.SIGKILL, (point, log[-3000:])
        out = tmp_path / point
        kept = (out / "predictions.jsonl").read_text()
        rerun = Predictor()
        evaluate(_cfg(bench, out), rerun)
        # the predictions written before the kill are kept, byte for byte, and not asked again
        assert (out / "predictions.jsonl").read_text().startswith(kept), point
        assert not set(rerun.seen) & {json.loads(line)["id"] for line in kept.splitlines()}, point
        assert _outputs(out) == _outputs(straight), point
        assert _left_over(out) == [], f"{point}: left behind by the killed run, after the rerun"


def _started(gate: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while not Path(str(gate) + ".started").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.02)


def test_sigterm_from_the_queue_stops_with_one_line_and_the_rerun_resumes(tmp_path):
    """A queue's preemption or time limit sends SIGTERM: a line that says the rerun resumes, exit 143, the lock
    given back, the predictions made kept; the rerun asks only for the rest and ends as an uninterrupted run."""
    bench = _bench(tmp_path / "bench")
    out, gate = tmp_path / "out", tmp_path / "gate"
    proc = _child(bench, out, WAIT_FOR=str(gate), WAIT_AT="3")
    _started(gate, proc)
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=60)[0]
    assert proc.returncode == 143, log[-3000:]
    assert "eval.py: error: stopped by SIGTERM" in log and "the same command resumes" in log
    assert str(out / "predictions.jsonl") in log
    assert _left_over(out) == []
    kept = [json.loads(line)["id"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(kept) == 6  # three batches of two
    rerun = Predictor()
    evaluate(_cfg(bench, out), rerun)
    assert sorted(rerun.seen + kept) == sorted(f"m{i}" for i in range(12))
    straight = tmp_path / "straight"
    evaluate(_cfg(bench, straight), Predictor())
    assert _outputs(out) == _outputs(straight)


def test_a_second_eval_into_a_folder_in_use_is_refused_naming_it_and_the_first_run_is_unharmed(tmp_path):
    bench = _bench(tmp_path / "bench")
    out = tmp_path / "out"
    gate = tmp_path / "gate"
    first = _child(bench, out, WAIT_FOR=str(gate))
    try:
        _started(gate, first)  # the first run is in its first batch
        # the same command by mistake (a job array sharing tag), and another checkpoint's run (another prompt):
        # before its first answer is written, the first run's run.json locks nothing
        for extra in ((), ("system_prompt='Be brief.'",)):
            second = Predictor()
            with pytest.raises(EvalConfigError, match="in use by another eval.py") as err:
                evaluate(_cfg(bench, out, *extra), second)
            assert str(out) in str(err.value) and f"pid {first.pid}" in str(err.value)
            assert second.seen == []
    finally:
        gate.write_text("")
        log = first.communicate(timeout=120)[0]
    assert first.returncode == 0, log[-3000:]
    straight = tmp_path / "straight"
    evaluate(_cfg(bench, straight), Predictor())
    assert _outputs(out) == _outputs(straight)  # each item once, the first run's settings
    assert json.loads((out / "run.json").read_text()).get("system_prompt") is None
    assert _left_over(out) == []


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path, caplog):
    bench = _bench(tmp_path / "bench")
    out = tmp_path / "out"
    out.mkdir()
    (out / "eval.lock").write_text(json.dumps({"pid": 999999999, "host": "gone"}) + "\n")
    with caplog.at_level(logging.WARNING, logger="musicflamingo.eval.runner"):
        evaluate(_cfg(bench, out), Predictor())
    assert "taking over the lock of pid 999999999" in caplog.text
    assert _left_over(out) == []


# ---------------------------------------------------------------------------------------------------- progress
def _items(n: int) -> list[EvalItem]:
    return [
        EvalItem(
            id=f"m{i}", audio="/none.wav", prompt="Which?", task="mcq", choices=CHOICES, answer=CHOICES[i % 4]
        )
        for i in range(n)
    ]


def test_a_long_eval_logs_progress_lines_in_a_job_log(tmp_path, monkeypatch, caplog):
    """stderr a file (a queue's job log): no bar, so log lines say how far, how fast, how long yet and how many
    were reused on resume; about 20 of them however long the run."""
    monkeypatch.setattr(runner, "stderr_is_terminal", lambda: False)
    items = _items(1000)
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps({"id": it.id, "prediction": "(A)"}) + "\n" for it in items[:400]))
    with caplog.at_level(logging.INFO, logger="musicflamingo.eval.runner"):
        predict_items(items, Predictor(), path, batch_size=7, progress=True, desc="nsynth")
    lines = [r.getMessage() for r in caplog.records if "items/s" in r.getMessage()]
    assert 15 <= len(lines) <= 25, lines
    assert lines[0].startswith("nsynth: 7/600 items (400 more reused from predictions.jsonl)")
    assert lines[-1].startswith("nsynth: 600/600 items") and "ETA 0:00" in lines[-1]
    assert all("elapsed" in line and "ETA" in line for line in lines)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="musicflamingo.eval.runner"):  # progress=false: quiet
        predict_items(_items(1010), Predictor(), path, batch_size=7, progress=False)
    assert not [r for r in caplog.records if "items/s" in r.getMessage()]


# ------------------------------------------------------------------------------------------------------- scale
def test_resuming_10k_items_reads_the_file_once_and_appends_only_the_new_rows(tmp_path, monkeypatch):
    """The non-model cost of a resume is linear: predictions.jsonl read once (not per item or per batch), each
    batch one append of its own rows (never the whole file rewritten), the model asked only for what is missing."""
    items = _items(10_000)
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps({"id": it.id, "prediction": "(A)"}) + "\n" for it in items[:9_999]))
    before = path.stat().st_size
    reads, writes = [], []
    real_read_bytes, real_open = Path.read_bytes, Path.open

    def read_bytes(self):
        reads.append(self.name)
        return real_read_bytes(self)

    class Counted:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            writes.append(len(data))
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    def open_(self, mode="r", *a, **k):
        f = real_open(self, mode, *a, **k)
        return Counted(f) if self.name == "predictions.jsonl" and "a" in mode else f

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    monkeypatch.setattr(Path, "open", open_)
    model = Predictor()
    preds = predict_items(items, model, path, batch_size=8, progress=False)
    assert model.seen == ["m9999"] and len(preds) == 10_000
    assert reads == ["predictions.jsonl"]
    assert writes == [path.stat().st_size - before] and writes[0] < 100


def test_scoring_and_reporting_10k_items_writes_each_file_once(tmp_path, monkeypatch):
    """Scoring and the report over 10,000 finished items: every output written once, whole."""
    from musicflamingo.checkpoint import replace_file

    items = _items(10_000)
    for i, it in enumerate(items):
        it.groups = {"question_type": f"q{i % 5}"}
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps({"id": it.id, "prediction": _answer(it)}) + "\n" for it in items))
    written: list[str] = []

    def counted(p, write):
        written.append(Path(p).name)
        return replace_file(p, write)

    monkeypatch.setattr("musicflamingo.eval.report.replace_file", counted)
    model = Predictor()
    res = run_benchmark(items, model, tmp_path, batch_size=8, progress=False, name="scale")
    assert model.seen == [] and res["num_scored"] == 10_000
    assert sorted(written) == sorted(set(written)), written  # no file rewritten
    assert {"per_item.jsonl", "results.json", "results.md"} <= set(written)
    assert len((tmp_path / "per_item.jsonl").read_text().splitlines()) == 10_000
