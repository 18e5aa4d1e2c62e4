"""The "fresh machine, two commands" journey (README "Two commands"): `make setup` / `make test` / `make demo`
and `python -m musicflamingo.demo`'s options, reruns and errors, at toy size."""

from __future__ import annotations

import ast
import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAKE = shutil.which("make")
needs_make = pytest.mark.skipif(MAKE is None, reason="needs make")
needs_fluidsynth = pytest.mark.skipif(
    shutil.which("fluidsynth") is None, reason="needs Debian's fluidsynth (make setup)"
)
TINY = ["--n-train", "8", "--n-val", "1", "--n-test", "2", "--n-other", "2", "--max-steps", "2"]
# A budget of an hour: the steps asked end each stage, never `trainer.max_time` (with --minutes 1 a loaded machine's
# run was cut at 1 of 2 steps, and the test failed).
TINY += ["--caption-steps", "1", "--minutes", "60", "--threads", "1"]


def _demo(argv: list[str], capsys) -> tuple[int, str]:
    """Run the demo's main(argv): (exit code, stderr)."""
    from musicflamingo.demo import main

    code = 0
    try:
        main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err


# ------------------------------------------------------------------------------------------ the demo's options


@pytest.mark.parametrize(
    "bad, expected",
    [
        (["--n-train", "0"], "argument --n-train: expected an integer >= 1, got 0"),
        (["--n-test", "0"], "argument --n-test: expected an integer >= 1, got 0"),
        (["--n-other", "0"], "argument --n-other: expected an integer >= 1, got 0"),
        (
            ["--max-steps", "0", "--caption-steps", "0"],
            "argument --max-steps: expected an integer >= 1, got 0",
        ),
        (["--caption-steps", "-1"], "argument --caption-steps: expected an integer >= 1, got -1"),
        (["--minutes", "0"], "argument --minutes: expected a number of minutes > 0, got '0'"),
        (["--minutes", "-1"], "argument --minutes: expected a number of minutes > 0"),
        (["--minutes", "inf"], "argument --minutes: expected a number of minutes > 0"),
        (["--minutes", "0.001"], "argument --minutes: 0.001 gives training stage 1 0 s"),
        (["--seed", "-1"], "argument --seed: expected an integer in 0..4294967295, got -1"),
        (["--threads", "0"], "argument --threads: expected an integer >= 1"),
        (["--vocab-size", "10"], "argument --vocab-size: expected an integer >= 263, got 10"),
        (["--n-train", "many"], "argument --n-train: expected an integer >= 1, got 'many'"),
    ],
)
def test_bad_options_are_refused_before_any_work(tmp_path, capsys, bad, expected):
    """Before: --minutes 0 exported an untrained model and exited 0, --max-steps 0 --caption-steps 0 and --seed -1
    gave tracebacks, --caption-steps 0 / --n-test 0 / --n-other 0 failed only after the corpus or the training."""
    out = tmp_path / "demo"
    code, err = _demo(["--out", str(out), *TINY, *bad], capsys)
    assert code == 2, err[-2000:]
    assert expected in err, err[-2000:]
    assert "Traceback" not in err
    assert not out.exists()  # refused before anything was written


def test_missing_fluidsynth_is_one_line_naming_the_packages(tmp_path, capsys, monkeypatch):
    """Before: SynthesizerNotFoundError (a RuntimeError) reached the user as a traceback with exit 1."""
    real_which = shutil.which
    monkeypatch.setattr(
        shutil, "which", lambda name, *a, **k: None if name == "fluidsynth" else real_which(name)
    )
    code, err = _demo(["--out", str(tmp_path / "demo"), *TINY], capsys)
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    assert "apt-get install fluidsynth fluid-soundfont-gm" in err and "make setup" in err, err


@needs_fluidsynth
def test_missing_soundfont_is_one_line_naming_the_package(tmp_path, capsys, monkeypatch):
    from musicflamingo.data.synthetic import render

    monkeypatch.setattr(render, "DEFAULT_SOUNDFONT", str(tmp_path / "absent.sf2"))
    code, err = _demo(["--out", str(tmp_path / "demo"), *TINY], capsys)
    assert code == 2, err[-2000:]
    assert "fluid-soundfont-gm" in err and "absent.sf2" in err and "Traceback" not in err, err


def test_rerun_into_an_out_made_with_other_options_is_refused(tmp_path, capsys):
    """An --out written before demo.json existed (its stage-1 run folder says max_steps 6): a rerun with
    --max-steps 10 reused the 6-step model as if it were a 10-step one, and said nothing."""
    out = tmp_path / "demo"
    hydra = out / "train-questions" / ".hydra"
    hydra.mkdir(parents=True)
    (hydra / "config.yaml").write_text("seed: 0\ntrainer:\n  max_steps: 6\n")
    (out / "train-questions" / "export").mkdir()
    (out / "train-questions" / "export" / "config.json").write_text("{}")
    argv = ["--out", str(out), *TINY]
    argv[argv.index("--max-steps") + 1] = "10"
    code, err = _demo(argv, capsys)
    assert code == 2, err[-2000:]
    assert "made with --max-steps 6 (now --max-steps 10)" in err and "pass another --out" in err, err
    assert (out / "train-questions" / "export" / "config.json").read_text() == "{}"  # nothing touched


def test_report_lines():
    from argparse import Namespace

    from musicflamingo.demo import max_time, training_line

    args = Namespace(max_steps=1000, caption_steps=500, seed=0, n_train=800, minutes=18.0)
    cut = training_line(args, {"stage1": {"steps": 812}, "stage2": {"steps": 500}})
    assert (
        "stage 1 812 of 1000 steps, stopped at the --minutes 18 time limit; stage 2 500 of 500 steps" in cut
    )
    assert "steps done not recorded" in training_line(args, {})
    assert max_time(720) == "00:00:12:00" and max_time(90061) == "01:01:01:01"


@pytest.fixture
def fp32_training(monkeypatch):
    """The demo's training stages in float32: the recipes' bf16 autocast is ~6x slower than float32 on a CPU
    without AMX or AVX512-BF16 (each `small` step took tens of seconds), and the tests using this check what a run
    reuses and refuses, not bf16 numbers (test_demo.py and test_train.py run the recipes as written)."""
    from musicflamingo import demo

    compose = demo._compose

    def fp32(config_name: str, overrides: list[str]):  # noqa: ANN202
        return compose(
            config_name, [*overrides, "trainer.precision=32"] if config_name == "train" else overrides
        )

    monkeypatch.setattr(demo, "_compose", fp32)


@needs_fluidsynth
def test_demo_rerun_keeps_its_report_and_refuses_other_options(tmp_path, capsys, fp32_training):
    """Run, rerun (everything reused: the report keeps the corpus and training seconds instead of 0 s), rerun with
    another --vocab-size (refused: it reused the first tokenizer, saying nothing), retrain a stage (the old
    predictions are refused with a hint the demo can follow, not eval.py's tag=)."""
    out = tmp_path / "demo"
    argv = ["--out", str(out), *TINY]
    assert _demo(argv, capsys)[0] == 0
    first = (out / "results.md").read_text()
    record = json.loads((out / "demo.json").read_text())
    assert record["settings"]["max_steps"] == 2 and record["done"]["stage1"]["steps"] == 2
    assert "Training: stage 1 2 of 2 steps; stage 2 1 of 1 steps" in first
    # the other-seed corpus takes none of the training corpus's chorales ("other pieces")
    from musicflamingo.data.synthetic import CorpusInfo
    from musicflamingo.demo import chorale_sources

    other = json.loads((out / "synthetic-seed1" / "corpus.json").read_text())["config"]
    assert other.get("exclude_sources", []) == chorale_sources(CorpusInfo.from_dir(out / "synthetic"))
    assert other.get("exclude_sources") or not chorale_sources(CorpusInfo.from_dir(out / "synthetic"))

    assert _demo(argv, capsys)[0] == 0
    second = (out / "results.md").read_text()
    train_s = re.search(r"train_s (\d+)", first).group(1)
    assert f"train_s {train_s}," in second and "reused from an earlier run" in second, second
    assert first.split("## Three")[0] == second.split("## Three")[0]  # the same numbers

    code, err = _demo([*argv, "--vocab-size", "512"], capsys)
    assert code == 2 and "made with --vocab-size 1024 (now --vocab-size 512)" in err, err
    assert (out / "results.md").read_text() == second

    shutil.rmtree(out / "train")
    code, err = _demo(argv, capsys)
    assert code == 2, err[-2000:]
    assert f"delete {out / 'eval'} to score this run's model" in err and "tag=" not in err, err
    assert (out / "eval" / "predictions.jsonl").is_file()


# ----------------------------------------------------------------------------------------------- the Makefile


def _stubs(tmp_path: Path, scripts: dict[str, str], links: tuple[str, ...] = ("grep",)) -> Path:
    """A PATH folder with only these commands: shell scripts, and links to the real `links`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body + "\n")
        (bin_dir / name).chmod(0o755)
    for name in links:
        os.symlink(shutil.which(name), bin_dir / name)
    os.symlink(sys.executable, bin_dir / "python3")
    return bin_dir


def _make(target: str, path: Path, cwd: Path = ROOT, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [MAKE, "--no-print-directory", "-f", str(ROOT / "Makefile"), "-C", str(cwd), target, *extra],
        env={"PATH": str(path), "HOME": str(cwd)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def _dpkg_stubs(installed: str) -> dict[str, str]:
    """dpkg-query (and the dpkg -s an older Makefile used) that know only `installed`."""
    return {
        "dpkg-query": f'for p in {installed}; do [ "$p" = "${{@: -1}}" ] && {{ echo -n "install ok installed"; exit 0; }}; done; exit 1',
        "dpkg": f'for p in {installed}; do [ "$p" = "$2" ] && exit 0; done; exit 1',
    }


@needs_make
def test_make_apt_without_root_or_sudo_says_what_to_run(tmp_path):
    """Before: `/bin/bash: sudo: command not found`, make Error 127."""
    calls = tmp_path / "apt-calls"
    stubs = {"id": "echo 1000", "apt-get": f'echo "$@" >> {calls}', **_dpkg_stubs("fluidsynth ffmpeg")}
    r = _make("apt", _stubs(tmp_path, stubs))
    assert r.returncode != 0
    assert "fluid-soundfont-gm chromium chromium-driver are missing" in r.stderr, r.stderr
    assert (
        "needs root" in r.stderr
        and "'apt-get install fluid-soundfont-gm chromium chromium-driver'" in r.stderr
    )
    assert not calls.exists()


@needs_make
def test_make_apt_as_root_installs_only_what_is_missing(tmp_path):
    calls = tmp_path / "apt-calls"
    stubs = {"id": "echo 0", "apt-get": f'echo "$@" >> {calls}', **_dpkg_stubs("fluidsynth ffmpeg chromium")}
    r = _make("apt", _stubs(tmp_path, stubs))
    assert r.returncode == 0, r.stderr
    lines = calls.read_text().splitlines()
    assert lines[0] == "update -qq" and lines[1].endswith(
        "install -y -qq --no-install-recommends fluid-soundfont-gm chromium-driver"
    )


@needs_make
def test_make_apt_has_nothing_to_do_when_all_is_installed(tmp_path):
    calls = tmp_path / "apt-calls"
    everything = "fluidsynth fluid-soundfont-gm ffmpeg chromium chromium-driver"
    stubs = {"id": "echo 1000", "apt-get": f'echo "$@" >> {calls}', **_dpkg_stubs(everything)}
    r = _make("apt", _stubs(tmp_path, stubs))
    assert r.returncode == 0 and not calls.exists() and r.stdout == "" and r.stderr == "", (
        r.stdout,
        r.stderr,
    )


@needs_make
def test_make_apt_without_apt_get_names_what_is_missing(tmp_path):
    """Before: nothing said, so `make demo` failed later on the missing synthesizer."""
    r = _make("apt", _stubs(tmp_path, {"id": "echo 1000"}))
    assert r.returncode == 0, r.stderr
    assert "no apt-get here" in r.stderr and "fluidsynth ffmpeg" in r.stderr, r.stderr


@needs_make
def test_make_venv_remakes_a_venv_whose_creation_failed_and_is_then_a_no_op(tmp_path):
    """`python3 -m venv` without ensurepip (Debian without python3-venv) leaves .venv/bin/python and no pip; the
    Makefile tested for python, so every later `make setup` failed on the missing pip until .venv was deleted."""
    work = tmp_path / "work"
    work.mkdir()
    for name in ("requirements.txt", "requirements-test.txt", "pyproject.toml"):
        (work / name).write_text("")
    venv = work / ".venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").write_text("#!/bin/bash\n")
    (venv / "python").chmod(0o755)
    log = tmp_path / "pip-calls"
    fake_python = tmp_path / "fake-python3"
    fake_python.write_text(
        "#!/bin/bash\n"  # python3 -m venv DIR: a venv whose pip logs its arguments
        f'[ "$1 $2" = "-m venv" ] && printf \'#!/bin/bash\\necho "$@" >> {log}\\n\' > "$3/bin/pip" '
        '&& chmod +x "$3/bin/pip"\n'
    )
    fake_python.chmod(0o755)
    path = _stubs(tmp_path, {}, links=("grep", "touch", "chmod"))
    r = _make("venv", path, work, f"PY={fake_python}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert log.read_text().count("install") == 3 and (venv / ".installed").is_file()
    again = _make("venv", path, work, f"PY={fake_python}", "-q")  # -q: exit 0 when up to date
    assert again.returncode == 0


@needs_make
def test_make_clean_keeps_trained_models(tmp_path):
    """Before: `make clean` ran `rm -rf outputs`: every training run, evaluation and the demo's model."""
    work = tmp_path / "work"
    (work / "outputs" / "demo" / "train" / "export").mkdir(parents=True)
    (work / ".pytest_cache").mkdir()
    r = subprocess.run(
        [MAKE, "-f", str(ROOT / "Makefile"), "-C", str(work), "clean"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert (work / "outputs" / "demo" / "train" / "export").is_dir() and not (work / ".pytest_cache").exists()


@needs_make
def test_make_test_is_what_ci_and_the_readme_run():
    """README: `make test` runs the suite CI runs (.ci/run); the default selection leaves out slow and gpu checks
    (pyproject's addopts), `make test-slow` runs the slow ones."""
    assert re.search(r"^(exec )?make test$", (ROOT / ".ci" / "run").read_text(), re.MULTILINE)
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme and "make test-slow" in readme
    dry = subprocess.run(
        [MAKE, "-n", "-C", str(ROOT), "test", "test-slow", "demo"], capture_output=True, text=True
    )
    # the default selection (no -m of its own), on two workers that each take a whole file (0485730);
    # --durations only prints the slowest tests' times (4587503)
    assert re.search(
        r"\.venv/bin/python -m pytest -q -n 2 --dist loadfile( --durations=\d+)?$", dry.stdout, re.MULTILINE
    ), dry.stdout
    assert "pytest -q -m slow" in dry.stdout
    assert ".venv/bin/python -m musicflamingo.demo\n" in dry.stdout
    addopts = re.search(r'addopts = "(.*)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert "-m 'not slow and not gpu'" in addopts


# ------------------------------------------------------------------------------------------------ requirements

# imported under musicflamingo/ only where their feature is asked for, with a clear error when absent
OPTIONAL = {
    "torchcodec": "audio/io.py falls back to ffmpeg",
    "bitsandbytes": "QLoRA nf4 needs CUDA (requirements-test)",
    "tensorboardX": "loggers.py reads its event type only when Lightning writes through it (no tensorboard)",
}


def _requirement_names(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-r"):
            names.add(re.split(r"[<>=!~\[ ;]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def test_every_runtime_import_is_a_runtime_requirement():
    runtime = _requirement_names(ROOT / "requirements.txt")
    test_only = _requirement_names(ROOT / "requirements-test.txt")
    assert "transformers" not in runtime and "transformers" in test_only
    pins = (ROOT / "requirements.txt").read_text()
    assert re.search(r"^torch==2\.14\.1$", pins, re.M) and re.search(r"^torchaudio==2\.11\.0$", pins, re.M)
    dists = md.packages_distributions()
    files = [
        *(ROOT / "musicflamingo").rglob("*.py"),
        *(ROOT / n for n in ("train.py", "eval.py", "infer.py", "serve.py")),
    ]
    missing = {}
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            for mod in (m.split(".")[0] for m in mods):
                if mod in sys.stdlib_module_names or mod == "musicflamingo" or mod in OPTIONAL:
                    continue
                names = {d.lower().replace("_", "-") for d in dists.get(mod, [mod])}
                if not names & runtime:
                    missing.setdefault(mod, str(f.relative_to(ROOT)))
    assert not missing, f"imported but not in requirements.txt: {missing}"
