"""Review 7, crash safety: real failing writes and real kills on every file a user keeps.

A full disk is made real with ``RLIMIT_FSIZE`` in a child process (SIGXFSZ ignored): every write past the limit
fails in the kernel (EFBIG), short write first, exactly where a full disk fails it, also inside torch's zip
writer, safetensors' Rust writer and pyarrow, which a monkeypatched ``open`` or ``os.write`` never reaches.
Each test checks that the file written before survives whole, that no temporary file is left, and that the error
is an OSError / project error naming the file (the entry points print those as one line).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from musicflamingo.cli import user_error_line

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

PRELUDE = """
import json, os, resource, signal, sys
from pathlib import Path
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

def full_disk(limit):  # from here on, writing past `limit` bytes of any file fails, as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

def report(e):
    from musicflamingo.cli import user_error_line
    print("RESULT " + json.dumps({"type": type(e).__name__, "message": str(e),
        "filename": getattr(e, "filename", None), "line": user_error_line(e)}))
"""


def _child(code: str, tmp: Path) -> dict:
    """Run PRELUDE + `code` in a fresh interpreter (cwd `tmp`); the dict its `report(e)` printed."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]))
    proc = subprocess.run(
        [sys.executable, "-c", PRELUDE + code], cwd=tmp, env=env, capture_output=True, text=True, timeout=120
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


def _leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.endswith(".tmp"))


# ---------------------------------------------------------------------------------------------- Lightning
# Both writers live in musicflamingo.callbacks, which imports Lightning (seconds per interpreter): one child runs
# both cases, each in its own folder, the file size limit lifted again between them.
LIGHTNING_CASES = """
import torch
from types import SimpleNamespace
from musicflamingo.callbacks import BadSampleReport, atomic_torch_save
from musicflamingo.data.dataset import BadSample, BadSampleTracker

def case(name, limit, write):  # write() with writes past `limit` failing; then without a limit again
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    full_disk(limit)
    try:
        write()
    except BaseException as e:
        print("CASE " + name)
        report(e)
    else:
        print("CASE " + name)
        print("RESULT " + json.dumps({"type": None}))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

ckpt = os.path.join(sys.argv[1], "ckpt", "checkpoints", "last.ckpt")
atomic_torch_save({"step": 1, "w": torch.ones(10)}, ckpt)
case("ckpt", os.path.getsize(ckpt) + 1000, lambda: atomic_torch_save({"step": 2, "w": torch.randn(100, 100)}, ckpt))

report_path = os.path.join(sys.argv[1], "report", "bad_samples.jsonl")
os.makedirs(os.path.dirname(report_path))
tracker = BadSampleTracker()
trainer = SimpleNamespace(datamodule=SimpleNamespace(train_bad_samples=tracker), is_global_zero=True)
callback = BadSampleReport(report_path)
tracker.update(10, [BadSample(0, "a", "m.jsonl:1", "undecodable")], check=False)
callback._write(trainer)
tracker.update(10, [BadSample(i, f"id{i}", f"m.jsonl:{i + 1}", "x" * 200) for i in range(1, 40)], check=False)
case("report", os.path.getsize(report_path) + 10, lambda: callback._write(trainer))
"""


@pytest.fixture(scope="module")
def lightning_writes(tmp_path_factory) -> dict[str, tuple[dict, Path]]:
    """{case: (what its `report(e)` printed, its folder)} for the checkpoint and the bad-sample report written on
    a full disk, from one child interpreter."""
    tmp = tmp_path_factory.mktemp("full_disk_lightning")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]))
    proc = subprocess.run(
        [sys.executable, "-c", PRELUDE + LIGHTNING_CASES, str(tmp)],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = [x for x in proc.stdout.splitlines() if x.startswith(("CASE ", "RESULT "))]
    got = {}
    for name_line, result_line in zip(lines[::2], lines[1::2], strict=True):
        name = name_line[len("CASE ") :]
        got[name] = (json.loads(result_line[len("RESULT ") :]), tmp / name)
    assert sorted(got) == ["ckpt", "report"], proc.stdout[-2000:]
    return got


def test_full_disk_during_a_lightning_checkpoint_keeps_the_old_one_and_names_it(lightning_writes):
    """torch's zip writer turns the OSError of a failed write into `RuntimeError: [enforce fail at
    inline_container.cc] unexpected pos ...`: `train.py` printed that traceback, naming no file (the earlier test
    monkeypatched torch.save to raise an OSError, which the real one never does)."""
    got, folder = lightning_writes["ckpt"]
    ckpt = folder / "checkpoints" / "last.ckpt"
    assert got["type"] == "OSError" and got["filename"] == str(ckpt), got
    assert got["line"] == f"{ckpt}: cannot write the checkpoint: File too large"
    assert torch.load(ckpt, weights_only=True)["step"] == 1  # the previous checkpoint, whole
    assert _leftovers(folder) == []


def test_full_disk_while_writing_the_bad_sample_report_keeps_the_last_report(lightning_writes):
    """`bad_samples.jsonl` and its summary are rewritten at every checkpoint: they were truncated first, so a full
    disk (or a kill) left a torn report instead of the last complete one."""
    got, folder = lightning_writes["report"]
    report_path = folder / "bad_samples.jsonl"
    assert got["type"] == "OSError" and got["filename"] == str(report_path), got
    rows = [json.loads(line) for line in report_path.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a"]  # the report of the last checkpoint, whole
    assert json.loads(report_path.with_suffix(".summary.json").read_text())["bad"] == 1
    assert _leftovers(folder) == []


# ---------------------------------------------------------------------------------------------- HF-layout saves
def test_full_disk_during_save_pretrained_is_one_checkpoint_error_and_keeps_the_old_weights(tmp_path):
    """safetensors raises `SafetensorError: Error while serializing: I/O error: File too large (os error 27)`,
    not an OSError: `save_files` did not turn it into its CheckpointError, so an export on a full disk was a
    traceback naming no folder."""
    folder = tmp_path / "export"
    got = _child(
        f"""
import torch
from musicflamingo import MusicFlamingo, MusicFlamingoConfig
torch.manual_seed(0)
model = MusicFlamingo(MusicFlamingoConfig.from_name("tiny"))
model.save_pretrained({str(folder)!r})
torch.save(model.state_dict(), {str(tmp_path / "old.pt")!r})
with torch.no_grad():
    for p in model.parameters():
        p.add_(1.0)
folder = Path({str(folder)!r})
assert (folder / "model.safetensors").stat().st_size > 4 * (folder / "config.json").stat().st_size
full_disk((folder / "config.json").stat().st_size + 1000)  # the JSON files fit, the weights do not
try:
    model.save_pretrained({str(folder)!r})
except BaseException as e:
    report(e)
""",
        tmp_path,
    )
    assert got["type"] == "CheckpointError", got
    assert got["line"] == f"{folder}: cannot save the checkpoint (File too large)"
    from musicflamingo import MusicFlamingo

    loaded = MusicFlamingo.from_pretrained(folder, mmap=False).state_dict()
    old = torch.load(tmp_path / "old.pt", weights_only=True)
    assert all(torch.equal(loaded[k], old[k]) for k in old)  # the earlier save, untouched
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]


# ---------------------------------------------------------------------------------------------- eval
def test_full_disk_during_eval_predictions_names_the_file_and_the_rerun_finishes(tmp_path):
    """A full disk while appending to predictions.jsonl raised an OSError naming no file (`eval.py` showed a
    traceback), and with a buffered file, closing it retried the write. Now the line names the file; the rerun cuts
    the torn tail and predicts each missing item once."""
    preds = tmp_path / "out" / "predictions.jsonl"
    code = f"""
from musicflamingo.eval.benchmarks import EvalItem
from musicflamingo.eval.runner import predict_items
items = [EvalItem(id=f"i{{k}}", task="caption", audio="a.wav", prompt="p", answer="x") for k in range(40)]
done = []
def predict(batch):
    if len(done) == 2:
        full_disk(os.path.getsize({str(preds)!r}) + 30)
    done.append(1)
    return ["answer " + it.id + " " + "y" * 40 for it in batch]
try:
    predict_items(items, predict, {str(preds)!r}, batch_size=4, progress=False)
except BaseException as e:
    report(e)
"""
    got = _child(code, tmp_path)
    assert got["type"] == "OSError" and got["filename"] == str(preds), got
    assert got["line"].startswith(f"{preds}: cannot add the predictions of 4 item(s): File too large")
    torn = preds.read_bytes()
    assert torn.count(b"\n") == 8 and not torn.endswith(b"\n")  # two batches whole, the third torn

    from musicflamingo.eval.benchmarks import EvalItem
    from musicflamingo.eval.runner import predict_items

    items = [EvalItem(id=f"i{k}", task="caption", audio="a.wav", prompt="p", answer="x") for k in range(40)]
    asked: list[str] = []

    def predict(batch):
        asked.extend(it.id for it in batch)
        return ["answer " + it.id for it in batch]

    out = predict_items(items, predict, preds, batch_size=4, progress=False)
    assert sorted(asked) == sorted(f"i{k}" for k in range(8, 40))  # only the missing ones
    ids = [json.loads(line)["id"] for line in preds.read_text().splitlines()]
    assert sorted(ids) == sorted(it.id for it in items) and len(out) == 40


_RESULTS = {
    "benchmark": "b",
    "source": "s",
    "num_items": 2,
    "num_predicted": 2,
    "num_scored": 2,
    "num_withheld": 0,
    "tasks": {"mcq": {"n": 2, "accuracy": 0.5, "accuracy_mmau": 0.5, "chance": 0.25}},
}


@pytest.mark.parametrize("which", ["results.json", "results.md", "accuracy.png"])
def test_full_disk_while_writing_the_report_keeps_the_old_report(tmp_path, which):
    """results.md and the plots were written in place (a full disk or a kill left a torn file where the last
    complete one was), results.json's temporary file stayed behind, and none of the errors named a file."""
    out = tmp_path / "out"
    got = _child(
        f"""
import musicflamingo.eval.report as report_module
from musicflamingo.eval.report import write_report
results = json.loads({json.dumps(json.dumps(_RESULTS))})
write_report(results, {str(out)!r})
sizes = {{p.name: p.stat().st_size for p in Path({str(out)!r}).iterdir()}}
which = {which!r}
big = "x" * 200000
if which == "results.json":
    results["source"] = big
elif which == "results.md":
    report_module.markdown_report = lambda r: big
else:  # a picture larger than what the disk holds
    results["tasks"]["mcq"]["by"] = {{"g": {{f"group {{k}}": dict(n=1, accuracy=0.5, accuracy_mmau=0.5, chance=0.2)
        for k in range(60)}}}}
    which = "accuracy_by_g.png"
    Path({str(out)!r}, which).write_bytes(b"old picture")
    sizes[which] = 11
full_disk(max(sizes.values()) + 10)
try:
    write_report(results, {str(out)!r})
except BaseException as e:
    report(e)
""",
        tmp_path,
    )
    target = out / ("accuracy_by_g.png" if which == "accuracy.png" else which)
    assert got["type"] == "OSError" and got["filename"] == str(target), got
    assert got["line"] == f"{target}: cannot write it: File too large"
    assert json.loads((out / "results.json").read_text())["source"] == "s"  # the old results, whole
    assert (out / "results.md").read_text().startswith("#")
    if which == "accuracy.png":
        assert target.read_bytes() == b"old picture"
    assert _leftovers(tmp_path) == []


def test_report_files_keep_the_umask_permissions(tmp_path):
    from musicflamingo.checkpoint import new_file_mode
    from musicflamingo.eval.report import write_report

    write_report(_RESULTS, tmp_path)
    for name in ("results.json", "results.md", "accuracy.png"):
        assert (tmp_path / name).stat().st_mode & 0o777 == new_file_mode(), name


def test_sigkill_while_rewriting_results_leaves_a_complete_file(tmp_path):
    """A rerun rewrites results.md over the last one: killed mid-write, it was torn (half of the new text)."""
    out = tmp_path / "out"
    out.mkdir()
    script = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from musicflamingo.eval.report import write_text
print("ready", flush=True)
k = 0
while True:
    k += 1
    write_text({str(out / "results.md")!r}, str(k % 10) * 4_000_000 + "\\n")
"""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for delay in (0.15, 0.33, 0.52):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env, text=True)
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        text = (out / "results.md").read_text() if (out / "results.md").exists() else None
        if text is not None:  # the first write may not have finished yet
            assert len(text) == 4_000_001 and len(set(text[:-1])) == 1, f"torn after {delay} s"
    # the kills leave temporary files, named after the file they were for
    assert all(n.startswith(".results.md.") and n.endswith(".tmp") for n in _leftovers(out))


# ---------------------------------------------------------------------------------------------- infer output=
def test_full_disk_during_infer_output_names_it_and_the_rerun_keeps_every_answer(tmp_path):
    """A full disk while adding an answer to output= was a traceback naming no file; the torn row it left was
    shorter than `{"audio": `, so the rerun refused the whole file (`expected a JSON object ...: name another
    file`) instead of dropping the torn row as it does after a kill."""
    out = tmp_path / "answers.jsonl"
    got = _child(
        f"""
from musicflamingo.inference import _Output
o = _Output({str(out)!r}, think=False)
o.write("a.wav", "p", "first")
o.write("b.wav", "p", "second")
full_disk(os.path.getsize({str(out)!r}) + 5)
try:
    o.write("c.wav", "p", "third")
except BaseException as e:
    report(e)
""",
        tmp_path,
    )
    assert got["type"] == "OSError" and got["filename"] == str(out), got
    assert got["line"].startswith(f"{out}: cannot add the answer for c.wav: File too large")
    assert out.read_bytes().endswith(b'\n{"aud')  # the torn row: 5 bytes

    from musicflamingo.inference import _Output

    again = _Output(str(out), think=False)
    assert again.answer("a.wav", "p") == "first" and again.answer("b.wav", "p") == "second"
    assert again.answer("c.wav", "p") is None  # asked again
    again.write("c.wav", "p", "third")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["answer"] for r in rows] == ["first", "second", "third"]


def test_a_user_line_without_newline_is_still_refused(tmp_path):
    """Only a prefix of our own rows counts as torn: a line of the user's stays refused, naming the line."""
    from musicflamingo.inference import InferenceError, _Output

    out = tmp_path / "answers.jsonl"
    out.write_text('{"audio": "a.wav", "prompt": "p", "answer": "x"}\nnotes')
    with pytest.raises(InferenceError, match=r"answers.jsonl:2: expected a JSON object"):
        _Output(str(out), think=False)
    assert out.read_text().endswith("notes")


def test_user_error_line_names_the_file_of_a_write_error():
    """What the tests above rely on: an OSError naming a file is one line at the entry points."""
    e = OSError(28, "cannot write it: No space left on device", "/x/results.md")
    assert user_error_line(e) == "/x/results.md: cannot write it: No space left on device"


# ---------------------------------------------------------------------------------------------- data index
def test_index_build_removes_the_temporary_files_of_killed_builds(tmp_path):
    """A build killed while writing `<manifest>.index.parquet` left `.<index>.<pid>.tmp` beside the user's data,
    and every later build kept it. Now a build removes those of dead processes (a running build's stay)."""
    from tiny_assets import make_tone, write_audio, write_tiny_tokenizer

    from musicflamingo.data.index import build_index, index_path
    from musicflamingo.processor import MusicFlamingoProcessor
    from musicflamingo.tokenizer import load_tokenizer

    write_tiny_tokenizer(tmp_path / "proc")
    processor = MusicFlamingoProcessor(load_tokenizer(tmp_path / "proc"), chunk_length=1.0, max_audio_len=4.0)
    write_audio(tmp_path / "a.wav", make_tone(220.0, 1.0))
    conv = [{"role": "user", "content": "<sound>Describe."}, {"role": "assistant", "content": "A tone."}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "r0", "audio": "a.wav", "conversations": conv}) + "\n")
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    where = index_path(manifest)
    dead = where.with_name(f".{where.name}.{victim.pid}.tmp")
    alive = where.with_name(f".{where.name}.{os.getppid()}.tmp")
    for tmp in (dead, alive):
        tmp.write_bytes(b"PAR1 torn")
    build_index(manifest, processor)
    assert where.is_file() and not dead.exists() and alive.exists()


@pytest.mark.parametrize("cut", ["empty", "half", "not_zip"])
def test_a_damaged_last_ckpt_is_named_as_damaged_not_as_unsafe(tmp_path, cut):
    """A `last.ckpt` cut short (a partial copy between machines) was refused as `cannot load checkpoint safely
    (weights_only=True): [Errno 22] Invalid argument` (or an empty reason for an empty file): as if it held
    pickled code. Now the message says the file is incomplete, with its size."""
    from musicflamingo.callbacks import AtomicCheckpointIO, atomic_torch_save

    path = tmp_path / "last.ckpt"
    atomic_torch_save({"w": torch.randn(300, 300)}, path)
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "half": data[: len(data) // 2], "not_zip": b"PK\x03\x04abc"}[cut])
    with pytest.raises(ValueError) as e:
        AtomicCheckpointIO().load_checkpoint(path)
    message = str(e.value)
    assert message.startswith(f"{path}: cannot load checkpoint: not a complete checkpoint file")
    assert f"({path.stat().st_size} bytes; " in message and "safely" not in message
