"""Startup cost of the entry points (review round 18, suite-startup journey).

`import lightning` costs several seconds: it imports torchmetrics, whose `__init__` imports scipy.signal,
matplotlib, torchvision (and transformers where installed). A `train.py` whose settings are refused, `plan=true`,
`--help` and every `eval.py`/`infer.py` run need none of it, so the entry scripts do not import it; a training run
imports it once the checks have passed. Pinned by what a fresh interpreter has in `sys.modules`, not by a clock.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

# Packages an entry script must not import at startup: Lightning and what it drags in, the loggers' packages (only
# a configured logger imports them), shards (litdata), plots (matplotlib), the synthetic corpus (music21), and the
# eval metrics' scorers.
HEAVY = (
    "lightning",
    "pytorch_lightning",
    "torchmetrics",
    "torchvision",
    "torch._dynamo",
    "matplotlib",
    "scipy",
    "sklearn",
    "transformers",
    "wandb",
    "tensorboard",
    "tensorboardX",
    "litdata",
    "music21",
    "mido",
    "pyarrow",
    "jiwer",
    "sacrebleu",
    "rouge_score",
)


def _run(code: str) -> subprocess.CompletedProcess:
    env_code = f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(TESTS)!r}]\n" + code
    proc = subprocess.run(
        [sys.executable, "-c", env_code], cwd=ROOT, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc


def test_entry_scripts_import_no_heavy_package():
    """`import train, eval, infer, serve` (what each command pays before Hydra reads its command line) loads none
    of HEAVY; serve.py's web server packages are its own business. The callback that training makes on first use
    (`training._SaveRunConfig`, a resume's config writer) still pickles and unpickles in another interpreter, as
    ddp_spawn needs."""
    import pickle

    import lightning

    proc = _run(
        "import pickle, train, eval, infer, serve\n"
        f"loaded = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "assert not loaded, f'imported at startup: {loaded}'\n"
        "from musicflamingo.training import _save_run_config_class\n"
        "print(pickle.dumps(_save_run_config_class()({'seed': 3}, 'run')).hex())\n"
    )
    callback = pickle.loads(bytes.fromhex(proc.stdout.split()[-1]))
    assert isinstance(callback, lightning.Callback) and (callback.cfg, callback.output_dir) == (
        {"seed": 3},
        "run",
    )


def test_help_and_refused_command_lines_do_not_import_lightning():
    """`train.py --help`, `--cfg job` and a misspelt override (refused with one line before Hydra runs the job) print
    and exit without importing Lightning: a researcher's typo costs no `import lightning`."""
    proc = _run(
        "import contextlib, io, runpy\n"
        "def run(*args):\n"
        "    sys.argv = ['train.py', *args]\n"
        "    out, err = io.StringIO(), io.StringIO()\n"
        "    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):\n"
        "        try:\n"
        "            runpy.run_path('train.py', run_name='__main__')\n"
        "            code = 0\n"
        "        except SystemExit as e:\n"
        "            code = e.code or 0\n"
        "    return code, out.getvalue() + err.getvalue()\n"
        "code, text = run('experment=lora')\n"
        "assert code == 2 and 'experiment' in text, (code, text)\n"
        "code, text = run('--help')\n"
        "assert code == 0 and 'train' in text, (code, text)\n"
        "code, text = run('--cfg', 'job', 'trainer.max_steps=3')\n"
        "assert code == 0 and 'max_steps: 3' in text, (code, text)\n"
        f"loaded = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "assert not loaded, f'imported: {loaded}'\n"
        "print('three commands, no lightning')\n"
    )
    assert "three commands, no lightning" in proc.stdout
