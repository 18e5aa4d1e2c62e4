"""Review round 11, "eval outputs": what a refused or planning eval.py writes into a folder another eval.py is using
(Hydra's `.hydra/` and job log were written before the folder's lock was taken), two infer.py into one `output=`
file, and the job log between the last prediction and the results.

The two-process tests run the real entry points (`@hydra.main`, Hydra's logging and output folder) in child Pythons,
eval.py with a stand-in model that waits at a gate so the second process comes while the first is mid-run.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_eval_review10 import Predictor, _bench, _items, _started
from test_eval_review10 import _overrides as _eval_args
from tiny_assets import make_tone, write_audio
from tiny_checkpoint import write_tiny_checkpoint

from musicflamingo.eval.runner import run_benchmark
from musicflamingo.inference import InferenceError, _Output

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

# A child process running an entry point as `python <script> ...` does. eval.py: with a stand-in model unless
# STANDIN=0; infer.py: the real (tiny) model. WAIT_FOR=<path>: before the first answer, write <path>.started and
# wait until <path> exists.
CHILD = r"""
import os, runpy, sys, time
from pathlib import Path

script = sys.argv[1]
wait_for = os.environ.get("WAIT_FOR")

def wait():
    if wait_for and not Path(wait_for).exists():
        Path(wait_for + ".started").write_text("")
        while not Path(wait_for).exists():
            time.sleep(0.02)

if script.endswith("eval.py") and os.environ.get("STANDIN", "1") == "1":
    import musicflamingo.eval as mf_eval
    from musicflamingo.eval import runner
    from test_eval_review10 import _answer

    def predict(batch):
        wait()
        return [_answer(it) for it in batch]

    real = runner.evaluate
    mf_eval.evaluate = lambda cfg: real(cfg, predict)
if script.endswith("infer.py"):
    import musicflamingo.inference as inference

    real_generate = inference.generate_answers

    def generate_answers(*args, **kwargs):
        wait()
        return real_generate(*args, **kwargs)

    inference.generate_answers = generate_answers
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


def _entry_point(script: str, cwd: Path, *args: str, **env: str) -> subprocess.Popen:
    e = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    e.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]), **env)
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(ROOT / script), *args],
        cwd=cwd,
        env=e,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_refused_eval_py_and_a_plan_into_a_folder_in_use_change_none_of_its_files(tmp_path):
    """Hydra wrote `<out>/.hydra/config.yaml` (and opened `eval.log`) before eval.py took `eval.lock`: a second
    eval.py refused for the folder in use, or `plan=true` into it, replaced the running run's config with its own
    and added its lines to the running run's job log. Now both leave every file of the folder as it was; the
    running run's `.hydra/` is its own and its `eval.log` holds the whole run, its first lines included."""
    bench = _bench(tmp_path / "bench")
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt")
    out, gate = tmp_path / "out", tmp_path / "gate"
    first = _entry_point("eval.py", tmp_path, *_eval_args(bench, out), WAIT_FOR=str(gate))
    try:
        _started(gate, first)  # the first run holds the folder, in its first batch
        before = _files(out)
        second = _entry_point("eval.py", tmp_path, *_eval_args(bench, out, "batch_size=3"))
        plan = _entry_point(
            "eval.py", tmp_path, *_eval_args(bench, out, f"ckpt={ckpt}", "plan=true"), STANDIN="0"
        )
        log2, log_plan = second.communicate(timeout=120)[0], plan.communicate(timeout=120)[0]
        assert second.returncode == 2, log2[-3000:]
        assert "in use by another eval.py" in log2 and f"pid {first.pid}" in log2
        assert plan.returncode == 0 and "peak" in log_plan.lower(), log_plan[-3000:]
        assert _files(out) == before
    finally:
        gate.write_text("")
        log = first.communicate(timeout=120)[0]
    assert first.returncode == 0, log[-3000:]
    config = (out / ".hydra" / "config.yaml").read_text()
    assert "batch_size: 2" in config and "plan: false" in config, config
    assert "batch_size=2" in (out / ".hydra" / "overrides.yaml").read_text()
    job_log = (out / "eval.log").read_text()
    assert "synthetic: 12 rows read from" in job_log.splitlines()[0], job_log  # logged before the lock
    assert job_log.count("rows read from") == 1 and "results in" in job_log, job_log
    assert not (out / "eval.lock").exists()
    # a rerun refused by run.json (another system prompt) keeps the config that describes the predictions
    config_files = {k: v for k, v in _files(out).items() if k.startswith(".hydra/")}
    third = _entry_point("eval.py", tmp_path, *_eval_args(bench, out, "system_prompt=Brief."))
    log3 = third.communicate(timeout=120)[0]
    assert third.returncode == 2 and "holds predictions of another run" in log3, log3[-3000:]
    assert {k: v for k, v in _files(out).items() if k.startswith(".hydra/")} == config_files


def test_the_job_log_says_scoring_between_the_last_prediction_and_the_results(tmp_path, caplog):
    """Scoring and the report of 10k caption items take seconds after the last progress line: a line says so."""
    with caplog.at_level(logging.INFO, logger="musicflamingo.eval.runner"):
        run_benchmark(_items(30), Predictor(), tmp_path, batch_size=8, progress=False, name="nsynth")
    lines = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("nsynth: scoring 30 predicted items") for m in lines), lines


# -------------------------------------------------------------------------------------------- infer.py output=
def test_a_second_infer_into_an_output_file_in_use_is_refused_and_the_lock_is_given_back(tmp_path, caplog):
    """Two _Output on one file (two infer.py, a job array given the same output=): the second is refused naming
    the file and the first one's pid; the file is the first's again once it closes; a killed run's lock is taken
    over by the rerun with a warning."""
    path = tmp_path / "answers.jsonl"
    first = _Output(str(path), think=False)
    with pytest.raises(InferenceError, match="in use by another infer.py") as err:
        _Output(str(path), think=False)
    assert f"output={path}" in str(err.value) and f"pid {os.getpid()}" in str(err.value)
    assert "name another output= file" in str(err.value)
    first.write("a.wav", "Describe.", "calm")
    first.close()
    assert not (tmp_path / "answers.jsonl.lock").exists()
    (tmp_path / "answers.jsonl.lock").write_text(json.dumps({"pid": 999999999, "host": "gone"}) + "\n")
    with caplog.at_level(logging.WARNING, logger="musicflamingo.runfolder"):
        with _Output(str(path), think=False) as again:
            assert again.answer("a.wav", "Describe.") == "calm"
    assert "taking over the lock of pid 999999999" in caplog.text
    assert not (tmp_path / "answers.jsonl.lock").exists()


@pytest.mark.slow  # two infer.py processes (~13 s); the in-process test above covers the lock
def test_two_infer_py_into_one_output_file_answer_each_input_once(tmp_path):
    """The same infer.py command started twice (a job array sharing output=): the second answered every input
    again into the file (each row twice). Now it is refused (exit 2) while the first runs, and the file holds one
    row per input."""
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt")
    music = tmp_path / "music"
    for i in range(3):
        write_audio(music / f"s{i}.wav", make_tone(200.0 + 50 * i, 0.5))
    out, gate = tmp_path / "answers.jsonl", tmp_path / "gate"
    args = [
        f"ckpt={ckpt}",
        f"audio={music}",
        f"output={out}",
        "max_new_tokens=4",
        "device=cpu",
        "stream=false",
    ]
    first = _entry_point("infer.py", tmp_path, *args, WAIT_FOR=str(gate))
    try:
        _started(gate, first)  # the model is loaded, no answer written yet
        second = _entry_point("infer.py", tmp_path, *args)
        log2 = second.communicate(timeout=120)[0]
        assert second.returncode == 2, log2[-3000:]
        assert f"output={out} is in use by another infer.py (pid {first.pid}" in log2, log2[-3000:]
    finally:
        gate.write_text("")
        log = first.communicate(timeout=120)[0]
    assert first.returncode == 0, log[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["audio"] for r in rows) == sorted(str(p) for p in music.iterdir())
    assert not (tmp_path / "answers.jsonl.lock").exists()
