"""Review round 8, the command lines: what Hydra and musicflamingo/cli.py make of typos, sweeps, run folders and
interpolations on the command line of train.py / eval.py / infer.py / serve.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from musicflamingo.cli import check_command_line, run_cli

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


def _refused(capsys, config: str, *argv: str) -> str:
    with pytest.raises(SystemExit) as info:
        check_command_line(config, list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1, err
    return err[0]


@pytest.mark.parametrize(
    ("config", "argv", "line"),
    [
        (
            "train",
            ["experment=lora"],
            "error: experment=lora: no setting experment (did you mean experiment=lora?); the top level takes: ",
        ),
        (
            "train",
            ["experiment=lorra"],
            "error: experiment=lorra: no such experiment config (did you mean experiment=lora?); experiment takes: ",
        ),
        (
            "eval",
            ["-m", "benchmark=synthetic,gtzann"],
            "error: benchmark=gtzann: no such benchmark config (did you mean benchmark=gtzan?); benchmark takes: ",
        ),
        (
            "train",
            ["model.optimizr.lr=1"],
            "error: model.optimizr.lr=1: no setting model.optimizr (did you mean model.optimizer.lr=1?); model ",
        ),
        (
            "train",
            ["model.net.lora.rnk=2"],
            "error: model.net.lora.rnk=2: no setting model.net.lora.rnk (did you mean model.net.lora.rank=2?)",
        ),
        ("train", ["+seed=3"], "error: +seed=3: seed is already set, `+` only adds new keys: write seed=3"),
        ("infer", ["~nokey"], "error: ~nokey: no setting nokey; the top level takes: "),
        (
            "train",
            ["hydra.run.dir=${oc.env:MF_REVIEW8_UNSET}/run"],
            "error: hydra.run.dir: cannot resolve its value: Environment variable 'MF_REVIEW8_UNSET' not found",
        ),
    ],
)
def test_a_command_line_hydra_cannot_compose_is_one_line_exit_2(config, argv, line, capsys, monkeypatch):
    """Hydra printed several lines (suggesting `+experment=lora`, which only moves the error) and exited 1; a run
    folder of an unset environment variable was a page of traceback."""
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.delenv("MF_REVIEW8_UNSET", raising=False)
    assert _refused(capsys, config, *argv).startswith(line)


def test_good_command_lines_pass_and_hydra_full_error_is_left_to_hydra(capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    assert (
        check_command_line("train", ["experiment=lora", "++seed=3", "--cfg", "job", "-m", "seed=0,1"]) == []
    )
    assert check_command_line("eval", ["-m", "benchmark=gtzan,mmau", "limit=3"]) == []
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    assert check_command_line("train", ["experment=lora"]) == []  # Hydra's own traceback, as asked
    assert capsys.readouterr().err == ""


def test_a_quoted_tilde_run_folder_is_expanded(monkeypatch, tmp_path):
    """'hydra.run.dir="~/runs/a"' (quoted, so the shell left the ~) made a folder named ~ in the working directory;
    the rest of the project (eval's output_dir, manifests, checkpoints) expands ~."""
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert check_command_line("train", ['hydra.run.dir="~/runs/a"']) == [f'hydra.run.dir="{tmp_path}/runs/a"']
    assert check_command_line("eval", ['output_dir="~/res"']) == [f'hydra.run.dir="{tmp_path}/res"']
    assert check_command_line("train", ["-m", "seed=0,1", 'paths.log_dir="~/logs"'])[0].startswith(
        f'hydra.sweep.dir="{tmp_path}/logs/train/multiruns/'
    )


def test_an_unresolvable_interpolation_is_one_line_naming_the_key(capsys, monkeypatch):
    """`paths.root_dir=${oc.env:UNSET}` or `seed=${nope}` reached train()'s resolve as a traceback, exit 1."""
    monkeypatch.delenv("MF_REVIEW8_UNSET", raising=False)
    for value, reason in [
        ("${oc.env:MF_REVIEW8_UNSET}", "Environment variable 'MF_REVIEW8_UNSET' not found"),
        ("${nope}", "Interpolation key 'nope' not found"),
    ]:
        cfg = OmegaConf.create({"paths": {"root_dir": value}})
        with pytest.raises(SystemExit) as info:
            run_cli(lambda c=cfg: OmegaConf.to_container(c, resolve=True))
        assert info.value.code == 2
        assert capsys.readouterr().err.splitlines() == [
            f"error: paths.root_dir: cannot resolve its value: {reason}"
        ]


def test_cli_typo_exits_2_with_one_line(tmp_path):
    """Through the real command line, from another working directory."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "experment=lora", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.splitlines()
    assert line.startswith("error: experment=lora: no setting experment (did you mean experiment=lora?)")
    assert not (tmp_path / "run").exists()


def test_a_failed_sweep_job_is_named_and_the_next_job_still_runs(tmp_path):
    """`eval.py -m ...`: a job's input error ended the whole sweep (sys.exit inside the job), so later jobs never
    ran, and its line did not say which job it was. Now each failed job is named, the others run, and the sweep
    exits with 2 after a summary."""
    roots = ",".join(str(tmp_path / n) for n in ("no_bench_a", "no_bench_b"))
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "eval.py"),
            "-m",
            f"benchmark.root={roots}",
            f"ckpt={tmp_path / 'no_ckpt'}",
            f"output_dir={tmp_path / 'out'}/${{hydra:job.num}}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(err) == 3, err
    assert err[0].startswith(f"eval.py: error: job #0 (benchmark.root={tmp_path / 'no_bench_a'}): ")
    assert err[1].startswith(f"eval.py: error: job #1 (benchmark.root={tmp_path / 'no_bench_b'}): ")
    assert err[2] == (
        f"eval.py: error: 2 job(s) of the sweep failed: job #0 (benchmark.root={tmp_path / 'no_bench_a'}); "
        f"job #1 (benchmark.root={tmp_path / 'no_bench_b'})"
    )
