"""Review round 20, infer.py journey: captioning a folder of hundreds of songs into output=.

The headers said where each answer stood ("[3/300]") but never when the run would end; and SIGTERM (a queue's
preemption or time limit) killed infer.py silently, where eval.py and train.py stop with one line saying what is kept.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_docs_review12 import _exit_code_row
from test_infer_review6 import make_cfg
from tiny_assets import make_tone, write_audio
from tiny_checkpoint import write_tiny_checkpoint

from musicflamingo import cli, inference
from musicflamingo.inference import InferInterrupted, _Progress, infer
from musicflamingo.runtime import clock


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def songs(tmp_path_factory) -> list[str]:
    d = tmp_path_factory.mktemp("audio")
    return [
        str(write_audio(d / f"{n}.wav", make_tone(f, 1.0))) for n, f in (("a", 440), ("b", 330), ("c", 550))
    ]


# ---------------------------------------------------------------------------------------------- progress
def test_progress_says_the_time_so_far_and_left_at_the_runs_pace():
    now = [100.0]
    progress = _Progress([4, 5, 6, 7, 8, 9], total=10, to_do=6, clock=lambda: now[0])
    assert progress.header(0) == "[5/10]"  # nothing done yet: no pace to tell
    now[0] += 40
    progress.done, progress.skipped = 2, 1  # 2 answers in 40 s; 3 left to answer (one file was skipped)
    assert progress.header(2) == "[7/10] elapsed 0:40, ETA 1:00"
    now[0] += 3600 * 2 - 40  # 3 answers in two hours: the 2 left take 40 min each
    progress.done = 3
    assert progress.header(3) == "[8/10] elapsed 2:00:00, ETA 1:20:00"
    assert progress.place(3) == "[8/10]"
    assert (clock(7.4), clock(59.6), clock(3723)) == ("0:07", "1:00", "1:02:03")


def test_headers_carry_the_elapsed_time_and_eta_once_an_answer_is_done(ckpt, songs, tmp_path):
    bad = tmp_path / "empty.wav"
    bad.write_bytes(b"")
    printed = io.StringIO()
    cfg = make_cfg(
        f"ckpt={ckpt}",
        f"audio=[{songs[0]},{bad},{songs[1]}]",
        "max_new_tokens=5",
        "batch_size=1",
        "stream=true",
        "skip_bad_audio=true",
    )
    infer(cfg, out=printed)
    headers = [line for line in printed.getvalue().splitlines() if line.startswith("== ")]
    # streamed: the first header comes before any answer is done; a skipped file's header says its place only
    assert headers[:2] == [f"== {songs[0]} == [1/3]", f"== {bad} == [2/3]"], printed.getvalue()
    assert re.fullmatch(rf"== {re.escape(songs[1])} == \[3/3\] elapsed \d+:\d\d, ETA \d+:\d\d", headers[2]), (
        headers
    )


# ---------------------------------------------------------------------------------------------- SIGTERM
def test_sigterm_stops_with_one_line_naming_what_is_kept_and_the_rerun_goes_on(
    ckpt, songs, tmp_path, monkeypatch
):
    """SIGTERM after the first answer is written: InferInterrupted (exit 143) saying how many answers the file
    keeps, the lock given back, SIGTERM's handler restored; the same command then asks only the others."""
    out = tmp_path / "answers.jsonl"
    base = [f"ckpt={ckpt}", f"audio=[{songs[0]},{songs[1]},{songs[2]}]", "max_new_tokens=2", f"output={out}"]
    write = inference._Output.write

    def write_then_terminate(self, *args, **kwargs):
        write(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # the handler runs here, in the main thread

    def unhandled(signum, frame):  # without infer()'s handler SIGTERM would end pytest itself
        raise AssertionError("SIGTERM reached the test's handler: infer() does not handle it")

    original = signal.signal(signal.SIGTERM, unhandled)
    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(inference._Output, "write", write_then_terminate)
    try:
        with pytest.raises(InferInterrupted) as stopped:
            infer(make_cfg(*base, "batch_size=1"), out=io.StringIO())
    finally:
        after = signal.signal(signal.SIGTERM, original)
    assert str(stopped.value) == (
        f"stopped by SIGTERM: 1 of 3 answers are in {out}; the same command asks only the others"
    )
    assert stopped.value.exit_code == 143 and after == before  # the handler before infer() is back
    # docs/robustness.md's exit-code table quotes that line (it said infer.py was killed by the signal)
    printed = f"error: {stopped.value}".replace("1 of 3", "N of M").replace(str(out), "<output>")
    assert f"`{printed}`" in _exit_code_row(143)["infer.py"], _exit_code_row(143)["infer.py"]
    assert not (tmp_path / "answers.jsonl.lock").exists()
    assert [json.loads(line)["audio"] for line in out.read_text().splitlines()] == [songs[0]]

    monkeypatch.setattr(inference._Output, "write", write)
    printed = io.StringIO()
    infer(make_cfg(*base), out=printed)
    assert [json.loads(line)["audio"] for line in out.read_text().splitlines()] == songs
    assert songs[0] not in printed.getvalue()  # not asked again


def test_infer_py_prints_the_sigterm_stop_as_one_line_and_exits_143(capsys):
    def stopped():
        raise InferInterrupted("stopped by SIGTERM: 1 of 3 answers are in a.jsonl; the same command ...", 15)

    with pytest.raises(SystemExit) as exited:
        cli.run_cli(stopped)
    assert exited.value.code == 143
    assert capsys.readouterr().err == (
        "error: stopped by SIGTERM: 1 of 3 answers are in a.jsonl; the same command ...\n"
    )


# ---------------------------------------------------------------------------------------------- --help
def test_help_prints_the_usage_and_every_setting_with_its_comment():
    """`infer.py --help` was Hydra's: every config group of configs/ (benchmark, experiment, trainer: none read by
    infer.py) and the settings without a word on any. It is now the usage and configs/infer.yaml's settings as
    written; every setting infer.py takes is in it."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(root / "infer.py"), "--help"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert text.startswith("Ask Music Flamingo about audio files") and "python infer.py ckpt=DIR" in text
    assert "top_k: 0                # 0 = off" in text and "# Quoting:" in text
    assert "Configuration groups" not in text and "benchmark:" not in text and "experiment" not in text
    # the settings, and no other block (defaults, hydra)
    settings = {line.split(":")[0] for line in text.splitlines() if re.match(r"^\w+:", line)}
    assert settings == set(make_cfg()), settings ^ set(make_cfg())


# ---------------------------------------------------------------------------------------------- items.jsonl fields
def test_an_items_other_fields_go_into_its_output_row(ckpt, songs, tmp_path):
    """An items.jsonl's ids were dropped: rows come in the order answers finish, so joining them back to the list
    (a reference answer, a song id) took matching audio and prompt texts. The item's other fields are its row's
    "item"; an item without any, and a file named on the command line, get none; a rerun reuses the rows."""
    items = tmp_path / "items.jsonl"
    lines = [
        {"audio": songs[0], "prompt": "Key?", "id": "q1", "answer": "A major", "meta": {"bpm": 120}},
        {"audio": songs[1]},
    ]
    items.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "answers.jsonl"
    cfg = make_cfg(f"ckpt={ckpt}", f"audio=[{items},{songs[2]}]", "max_new_tokens=2", f"output={out}")
    answers = infer(cfg, out=io.StringIO())
    rows = {r["audio"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert rows[songs[0]]["item"] == {"id": "q1", "answer": "A major", "meta": {"bpm": 120}}
    assert rows[songs[0]]["answer"] == answers[0] and rows[songs[0]]["prompt"] == "Key?"
    assert "item" not in rows[songs[1]] and "item" not in rows[songs[2]], rows
    assert infer(cfg, out=io.StringIO()) == answers and len(out.read_text().splitlines()) == 3
