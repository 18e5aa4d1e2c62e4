"""Startup cost of refused and short commands, part 2 (review round 18, startup-2 journey).

`import lightning` costs ~6 CPU s (torchmetrics, scipy.signal, matplotlib, torchvision) and `import torch` ~2.5:
a checkpoint writer (the crash tests' children), a refused training setting, `plan=true`, a run folder in use and
a command line refused before Hydra runs need neither Lightning nor, for the last, torch. Pinned by what a fresh
interpreter has in `sys.modules`, never by a clock.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from musicflamingo.cli import check_command_line

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
LIGHTNING = ("lightning", "pytorch_lightning", "torchmetrics", "musicflamingo.lit", "musicflamingo.callbacks")


def _run(code: str, cwd: Path = ROOT) -> str:
    """Run `code` in a fresh interpreter (repository and tests importable); its stdout."""
    code = f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(TESTS)!r}]\n" + code
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc.stdout


def test_atomic_torch_save_needs_no_lightning(tmp_path):
    """The crash tests' writer children (`atomic_torch_save` in a loop) imported Lightning with
    `musicflamingo.callbacks`: ~6 CPU s a child. It lives in `musicflamingo.checkpoint`; the old import still works."""
    out = _run(
        "import torch\n"
        "from musicflamingo.checkpoint import atomic_torch_save\n"
        f"atomic_torch_save({{'w': torch.ones(3)}}, {str(tmp_path / 'last.ckpt')!r})\n"
        f"print([m for m in {LIGHTNING!r} if m in sys.modules])\n"
    )
    assert out.split("\n")[-2] == "[]", out
    import torch

    from musicflamingo import callbacks, checkpoint

    assert callbacks.atomic_torch_save is checkpoint.atomic_torch_save
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["w"].tolist() == [1.0, 1.0, 1.0]


def test_refused_settings_plan_and_a_folder_in_use_do_not_import_lightning(tmp_path):
    """`check_train_settings` imported every `_target_` to read its signature (lightning.Trainer, ModelCheckpoint,
    musicflamingo.lit...): a refused `model.optimizer.lr=-1`, `plan=true` and a run folder another run holds each
    paid `import lightning` before saying one line. The signatures are read from the targets' source now; an
    unknown key still imports the target and is refused by name (tests/test_settings_review8.py)."""
    (tmp_path / "train.jsonl").write_text("")
    (tmp_path / "proc").mkdir()
    out = _run(
        "from pathlib import Path\n"
        "from train_fixtures import compose_train\n"
        "from musicflamingo.settings import SettingsError\n"
        "from musicflamingo.training import RunFolderInUseError, RunLock, train\n"
        f"tmp = Path({str(tmp_path)!r})\n"
        "def cfg(*args):\n"
        "    return compose_train(tmp, tmp / 'train.jsonl', tmp / 'proc', list(args))\n"
        "try:\n"
        "    train(cfg('model.optimizer.lr=-1'))\n"
        "    raise AssertionError('not refused')\n"
        "except SettingsError as e:\n"
        "    assert 'model.optimizer.lr=-1' in str(e), e\n"
        "assert 'plan' in train(cfg('plan=true'))[1]\n"
        "lock = RunLock(tmp / 'run').acquire()\n"
        "try:\n"
        "    train(cfg())\n"
        "    raise AssertionError('not refused')\n"
        "except RunFolderInUseError as e:\n"
        "    pass\n"
        f"print([m for m in {LIGHTNING!r} if m in sys.modules])\n",
        cwd=tmp_path,
    )
    assert out.split("\n")[-2] == "[]", out


def test_every_experiment_s_keys_are_checked_without_lightning():
    """The key check of each shipped experiment (GRPO's module and rewards, FSDP's strategy, every logger and
    callback) reads what it needs from source: no target of the shipped configs falls back to an import."""
    names = sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml"))
    assert "grpo" in names and "lora" in names
    out = _run(
        "from hydra import compose, initialize_config_dir\n"
        "from omegaconf import OmegaConf\n"
        "from musicflamingo.settings import CONFIG_DIR, _top_keys, check_known_keys\n"
        "with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base='1.3'):\n"
        f"    for name in {names!r}:\n"
        "        extra = ['logger=[csv,tensorboard,wandb]', 'trainer=ddp'] if name == 'lora' else []\n"
        "        cfg = compose('train', overrides=[f'experiment={name}', 'data.train=x.jsonl', *extra])\n"
        "        check_known_keys(OmegaConf.to_container(cfg, resolve=False), _top_keys('train'))\n"
        f"print([m for m in {LIGHTNING!r} if m in sys.modules])\n"
    )
    assert out.split("\n")[-2] == "[]", out


def _config_targets() -> list[str]:
    found: set[str] = set()

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("_target_"), str):
                found.add(node["_target_"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for path in (ROOT / "configs").rglob("*.yaml"):
        walk(yaml.safe_load(path.read_text()))
    return sorted(found)


EXTRA_TARGETS = [  # what a researcher adds with +callbacks.x._target_=... / +logger.x._target_=...
    "lightning.pytorch.callbacks.EarlyStopping",
    "lightning.pytorch.callbacks.LearningRateMonitor",
    "lightning.pytorch.loggers.CSVLogger",
    "torch.optim.SGD",
]


@pytest.mark.parametrize("target", _config_targets() + EXTRA_TARGETS)
def test_parameters_read_from_source_are_those_inspect_sees(target):
    """What makes the check above safe: for every `_target_` of the configs (and ones people add), the keyword
    parameters read from source are exactly those `inspect.signature` gives after importing it (a set read wrongly
    would let a misspelt key through)."""
    from musicflamingo import settings

    assert len(_config_targets()) >= 15
    source = settings._source_parameters(target)
    assert source is not settings._UNKNOWN, target
    assert source == settings._parameters(target, "x"), target


def test_what_source_cannot_tell_is_checked_by_import(tmp_path, monkeypatch):
    """An inherited `__init__`, a dataclass, a name bound by an assignment or a method: the source does not tell,
    so the target is imported and its signature decides (a key it lacks is still refused by name)."""
    from musicflamingo import settings
    from musicflamingo.settings import SettingsError, check_known_keys

    (tmp_path / "src_probe.py").write_text(
        "import dataclasses\n"
        "class Base:\n"
        "    def __init__(self, a, b=1): pass\n"
        "class Child(Base): pass\n"
        "@dataclasses.dataclass\n"
        "class Data:\n"
        "    x: int = 0\n"
        "def make(*, depth, width=2, **extra): pass\n"
        "def plain(p, /, q, *, r): pass\n"
        "Alias = Base\n"
        "class Tricky:\n"
        "    def __init__(self, z): pass\n"
        "    __init__ = Base.__init__\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    read = settings._source_parameters
    assert read("src_probe.Base") == {"a", "b"}
    assert read("src_probe.make") is None  # **extra: any key
    assert read("src_probe.plain") == {"q", "r"}  # p is positional-only
    for unknown in (
        "src_probe.Child",
        "src_probe.Data",
        "src_probe.Alias",
        "src_probe.Tricky",
        "src_probe.Base.x",
    ):
        assert read(unknown) is settings._UNKNOWN, unknown
    assert settings._parameters("src_probe.Data", "x") == {"x"}
    with pytest.raises(SettingsError, match=r"model\.c=3: unknown setting.*model takes: a, b"):
        check_known_keys({"model": {"_target_": "src_probe.Child", "a": 1, "c": 3}})
    with pytest.raises(SettingsError, match=r"model\._target_='src_probe\.Missing': no such class"):
        check_known_keys({"model": {"_target_": "src_probe.Missing"}})
    check_known_keys({"model": {"_target_": "src_probe.Base", "a": 1, "b": 2}})
    assert inspect.signature  # the fallback reads signatures with inspect


def test_a_refused_command_line_imports_no_torch():
    """A command line Hydra refuses (a misspelt key, a word without `=`) is named by each entry script without
    importing torch: the package's `__init__` loads the model lazily, the scripts import their job's module in
    `main`, and `run_cli` imports runtime when a job runs (was ~3 CPU s of imports before the line, now ~0.5)."""
    out = _run(
        "import contextlib, io, runpy\n"
        "err = io.StringIO()\n"
        "for argv in (['train.py', 'experment=lora'], ['eval.py', 'benchmark.limit=2'], ['infer.py', 'song.wav'],\n"
        "             ['serve.py', 'prot=1']):\n"
        "    sys.argv = argv\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        try:\n"
        "            runpy.run_path(argv[0], run_name='__main__')\n"
        "        except SystemExit as e:\n"
        "            assert e.code == 2, (argv, e.code, err.getvalue())\n"
        "text = err.getvalue()\n"
        "assert 'did you mean experiment=lora?' in text and 'did you mean limit=2' in text, text\n"
        "assert 'write audio=song.wav' in text and 'prot=1' in text, text\n"
        "print(sorted(m for m in ('torch', 'musicflamingo.runtime', 'musicflamingo.model', 'lightning') if m in sys.modules))\n"
    )
    assert out.split("\n")[-2] == "[]", out
    import musicflamingo

    assert musicflamingo.MusicFlamingo.__name__ == "MusicFlamingo"  # the lazy names still resolve
    assert musicflamingo.MusicFlamingoConfig.__name__ == "MusicFlamingoConfig"
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        musicflamingo.Nothing  # noqa: B018


@pytest.mark.parametrize(
    ("config", "arg", "hint"),
    [
        (
            "eval",
            "benchmark.limit=2",
            "(did you mean limit=2, a setting of eval.py itself?); benchmark takes: ",
        ),
        ("eval", "benchmark.batch_size=4", "(did you mean batch_size=4, a setting of eval.py itself?)"),
        ("train", "trainer.seed=3", "(did you mean seed=3, a setting of train.py itself?); trainer takes: "),
    ],
)
def test_an_entry_point_setting_typed_under_a_group_is_named(capsys, config, arg, hint):
    """`eval.py benchmark.limit=2` said only "no setting benchmark.limit; benchmark takes: ..." (the researcher meant
    eval.py's own limit=2, as `+benchmark.limit=2` is told by eval's benchmark check)."""
    with pytest.raises(SystemExit) as info:
        check_command_line(config, [arg])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {arg}: no setting {arg.split('=')[0]} ") and hint in err[0], err[0]
