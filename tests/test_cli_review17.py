"""Review round 17, mistyped command lines: a config group set to null, a run folder that is a file, a `{}` key set
with `=`, serve.py's log_level, and output / processor paths that are files, each one line naming the problem."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from test_cli_review8 import _refused

from musicflamingo.cli import check_command_line

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_full_error(monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)


@pytest.mark.parametrize(
    ("group", "options"), [("callbacks", "default"), ("logger", "csv, many, tensorboard")]
)
def test_a_config_group_set_to_null_is_one_line_saying_how_to_drop_it(group, options, capsys):
    """`callbacks=null` ended in Hydra's bare traceback "Config group override must be a string or a list. Got
    NoneType" (only HydraException was caught)."""
    line = _refused(capsys, "train", f"{group}=null")
    assert line.startswith(f"error: {group}=null: {group} is a config group"), line
    assert options in line and line.endswith(f"to drop the group write ~{group}"), line
    assert check_command_line("train", [f"~{group}"]) == []  # what it says to write composes


def test_a_run_folder_that_is_a_file_is_one_line_naming_the_key(tmp_path, capsys):
    """`hydra.run.dir=<a file>` was Hydra's FileExistsError traceback (exit 1); eval.py's `output_dir=<a file>`
    met it before the settings check."""
    file = tmp_path / "notes.txt"
    file.write_text("mine\n")
    assert _refused(capsys, "train", f"hydra.run.dir={file}") == (
        f"error: hydra.run.dir={str(file)!r}: a file, where a folder is expected"
    )
    assert _refused(capsys, "eval", f"output_dir={file}") == (
        f"error: output_dir={str(file)!r}: a file, where a folder is expected"
    )
    assert _refused(capsys, "train", f"hydra.run.dir={file}/run") == (
        f"error: hydra.run.dir={str(file / 'run')!r}: {file} is a file, where a folder is expected"
    )
    assert _refused(capsys, "train", "-m", "seed=0,1", f"hydra.sweep.dir={file}").startswith(
        "error: hydra.sweep.dir="
    )
    assert check_command_line("eval", [f"output_dir={tmp_path / 'new' / 'res'}"]) == []
    assert (
        check_command_line("train", ["--cfg", "job", f"hydra.run.dir={file}"]) == []
    )  # prints, makes no folder
    assert file.read_text() == "mine\n"


def test_a_key_holding_an_empty_dict_set_with_equals_says_to_write_a_plus(capsys):
    """`model.net.overrides={audio:{...}}` said "no setting model.net.overrides (did you mean
    model.net.overrides={...}?)", suggesting the same text: the key exists but holds {}, which takes keys only
    with a leading `+`; a dict naming a key its setting lacks named the setting instead of that key."""
    arg = "model.net.overrides={audio:{max_source_positions:100}}"
    line = _refused(capsys, "train", arg)
    assert line.startswith(f"error: {arg}: model.net.overrides is an empty dict"), line
    assert f"write +{arg} " in line, line
    assert check_command_line("train", [f"+{arg}"]) == []  # what it says to write composes
    line = _refused(capsys, "train", "model.net.lora={rnk:2}")
    assert line.startswith(
        "error: model.net.lora={rnk:2}: no setting model.net.lora.rnk (did you mean rank?); model.net.lora takes: "
    ), line


def test_serve_checks_log_level_before_logging_uses_it(capsys, monkeypatch):
    """`serve.py log_level=LOUD`: logging.basicConfig ran before any check: `ValueError: Unknown level: 'LOUD'`,
    a traceback and exit 1."""
    import logging

    monkeypatch.setattr(
        logging.root, "handlers", []
    )  # as in a fresh process (basicConfig skips a set-up root)
    spec = importlib.util.spec_from_file_location("serve_script_review17", ROOT / "serve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="serve", overrides=["log_level=LOUD"])
    with pytest.raises(SystemExit) as info:
        module.main(cfg)  # @hydra.main passes a config given to it straight to the function
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("error: log_level='LOUD': expected one of DEBUG, INFO"), err


def test_an_output_or_processor_path_through_a_file_says_it_is_a_file(tmp_path):
    """`infer.py output=<file>/x.jsonl` said "cannot write there (File exists)"; `from_pretrained(<file>)` said
    "processor directory not found"."""
    from musicflamingo.cli import user_error_line
    from musicflamingo.inference import InferenceError, _Output
    from musicflamingo.processor import MusicFlamingoProcessor

    file = tmp_path / "answers"
    file.write_text("mine\n")
    with pytest.raises(InferenceError) as err:
        _Output(str(file / "x.jsonl"), think=False)
    assert f"{file} is a file, where a folder is expected" in str(err.value), err.value
    with pytest.raises(NotADirectoryError) as err:
        MusicFlamingoProcessor.from_pretrained(file)
    assert user_error_line(err.value) == (
        f"{file}: a file, where the processor's folder (processor_config.json, tokenizer files) is expected"
    )
    assert file.read_text() == "mine\n"


def test_eval_py_output_dir_a_file_exits_2_with_one_line(tmp_path):
    """Through the real command line: Hydra's FileExistsError traceback and exit 1 before."""
    file = tmp_path / "results"
    file.write_text("mine\n")
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "eval.py"), f"output_dir={file}", "ckpt=x", "benchmark.root=x"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.splitlines() == [
        f"error: output_dir={str(file)!r}: a file, where a folder is expected"
    ]
    assert file.read_text() == "mine\n"
