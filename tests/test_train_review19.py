"""Review 19, fine-tuning on one's own data: a `_target_` whose module cannot be imported, a missing processor folder
or manifest are named before the model is built (they were found after it, as Hydra's "Error locating target" or a
bare "No such file or directory"); a run that keeps checkpoints by a validation metric names its best one."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from train_fixtures import compose_train, write_dataset, write_processor

from musicflamingo import training
from musicflamingo.settings import SettingsError, check_train_settings
from musicflamingo.training import train


@pytest.fixture(scope="module")
def data(tmp_path_factory):  # noqa: ANN001, ANN201
    root = tmp_path_factory.mktemp("review19")
    return write_processor(root / "proc"), write_dataset(root / "data", n=2)


@pytest.fixture
def no_fit(monkeypatch):  # noqa: ANN001, ANN201
    """train() stops where it would build the model and read the data: what is refused must be refused before."""

    def built(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the model and the data were about to be built")

    monkeypatch.setattr(training, "_fit", built)


def _module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, first_line: str) -> None:
    """A callback module `name` in tmp_path (on sys.path) whose second line is `first_line` and whose source shows
    the parameter `every`, so the settings' key check reads it without importing it."""
    (tmp_path / f"{name}.py").write_text(
        "import lightning as L\n"
        f"{first_line}\n\n\n"
        "class Blink(L.Callback):\n"
        "    def __init__(self, every: int = 1) -> None:\n"
        "        self.every = every\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))


@pytest.mark.parametrize(
    ("name", "line", "why"),
    [
        (
            "blink_missing_review19",
            "import not_installed_dep_review19",
            "No module named 'not_installed_dep_review19'",
        ),
        (
            "blink_badname_review19",
            "from lightning.pytorch.callbacks import NoSuchThing",
            "ImportError: cannot import name 'NoSuchThing'",
        ),
    ],
)
def test_a_target_whose_module_cannot_be_imported_is_named_before_the_model_is_built(
    name, line, why, data, tmp_path, monkeypatch, no_fit
):
    """The key check reads `Blink(every)` from the module's source and passed it; Hydra then failed to locate the
    target after the model and the data were built ("Error locating target", without the reason). Now the run
    imports its targets first and names the setting, the reason and the module's line."""
    proc, manifest = data
    _module(tmp_path, monkeypatch, name, line)
    extra = [f"+callbacks.blink._target_={name}.Blink", "+callbacks.blink.every=2"]
    cfg = compose_train(tmp_path, manifest, proc, ["trainer.max_steps=1", *extra])
    check_train_settings(OmegaConf.to_container(cfg, resolve=True))  # the source shows `every`: accepted here
    with pytest.raises(SettingsError) as err:
        train(cfg)
    message = str(err.value)
    assert message.startswith(f"callbacks.blink._target_='{name}.Blink': cannot be imported ("), message
    assert why in message and f"at {tmp_path / name}.py:2" in message, message
    assert not (tmp_path / "run" / ".hydra").exists()  # nothing of the run written yet


@pytest.mark.parametrize(
    ("name", "line", "key", "why"),
    [
        (
            "blink_key_review19",
            "from lightning.pytorch.callbacks import NoSuchThing",
            "evry",
            "ImportError: cannot",
        ),
        (
            "blink_syntax_review19",
            "x = (",
            "every",
            "SyntaxError: '(' was never closed (blink_syntax_review19.py",
        ),
    ],
)
def test_a_module_that_fails_as_it_runs_is_a_settings_error_not_a_traceback(
    name, line, key, why, data, tmp_path, monkeypatch
):
    """Where its source does not settle the keys (an unknown key; source that does not parse) the key check imports
    the target: a module whose own `from x import y` fails, or that does not parse, raised its bare ImportError or
    SyntaxError (a traceback) from the settings check."""
    proc, manifest = data
    _module(tmp_path, monkeypatch, name, line)
    extra = [f"+callbacks.blink._target_={name}.Blink", f"+callbacks.blink.{key}=2"]
    settings = OmegaConf.to_container(compose_train(tmp_path, manifest, proc, extra), resolve=True)
    with pytest.raises(SettingsError) as err:
        check_train_settings(settings)
    assert str(err.value).startswith(f"callbacks.blink._target_='{name}.Blink': cannot be imported ({why}"), (
        err.value
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "data.processor=null",
            "data.processor=None: expected the folder of the tokenizer and processor files",
        ),
        ("data.processor={tmp}/procx", "data.processor='{tmp}/procx': no such folder"),
        (
            "data.train=trainx.jsonl",
            "data.train='trainx.jsonl': no such manifest file or shard folder (read from",
        ),
        (
            "data.val=[{manifest},{{path:{tmp}/v.jsonl}}]",
            "data.val[1]='{tmp}/v.jsonl': no such manifest file",
        ),
    ],
)
def test_a_missing_processor_or_manifest_is_named_before_the_model_is_built(
    override, message, data, tmp_path, no_fit
):
    """They were found after the model was built (with model.net.init_from, minutes for the release): `data.processor`
    null as "data.processor: set a folder ...", a missing one as "procx: processor directory not found", a missing
    manifest as "trainx.jsonl: No such file or directory", none naming the setting."""
    proc, manifest = data
    fill = {"tmp": tmp_path, "manifest": manifest}
    cfg = compose_train(tmp_path, manifest, proc, ["trainer.max_steps=1", override.format(**fill)])
    with pytest.raises(SettingsError) as err:
        train(cfg)
    assert str(err.value).startswith(message.format(**fill)), err.value
    (tmp_path / "v.jsonl").write_text("")
    if "v.jsonl" in override:  # the same list with both manifests there goes on to build the model
        with pytest.raises(AssertionError, match="about to be built"):
            train(cfg)


def test_a_run_keeping_checkpoints_by_val_loss_names_its_best(data, tmp_path, caplog):
    """`callbacks.model_checkpoint.monitor=val/loss`: the files are named by step, so the best one was found by
    reading metrics.csv; the end of the run names it and its value."""
    proc, manifest = data
    overrides = [
        f"data.val={manifest}",
        "trainer.max_steps=3",
        "trainer.val_check_interval=1",
        "trainer.check_val_every_n_epoch=null",
        "callbacks.model_checkpoint.every_n_train_steps=null",
        "callbacks.model_checkpoint.monitor=val/loss",
        "callbacks.model_checkpoint.save_top_k=1",
        "export=false",
    ]
    with caplog.at_level(logging.INFO, logger="musicflamingo.training"):
        _, objects = train(compose_train(tmp_path, manifest, proc, overrides))
    checkpoint = objects["trainer"].checkpoint_callback
    best = Path(checkpoint.best_model_path)
    assert best.is_file() and best.name.startswith("step_"), best
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("best checkpoint")]
    score = float(checkpoint.best_model_score)
    assert lines == [f"best checkpoint by val/loss (min): {best} (val/loss={score:.6g})"], lines


def test_early_stopping_on_a_validation_metric_without_validation_data_is_refused(data, tmp_path, no_fit):
    """`+callbacks.early_stopping.monitor=val/loss` without data.val ran the whole first epoch (hours on a few
    thousand clips), then stopped with Lightning's RuntimeError traceback ("conditioned on metric `val/loss` which is
    not available"), before the first step checkpoint; with data.val it goes on."""
    proc, manifest = data
    stop = ["+callbacks.early_stopping._target_=lightning.pytorch.callbacks.EarlyStopping"]
    stop.append("+callbacks.early_stopping.monitor=val/loss")
    with pytest.raises(SettingsError) as err:
        train(compose_train(tmp_path, manifest, proc, stop))
    assert str(err.value).startswith(
        "callbacks.early_stopping.monitor=val/loss: no validation set (data.val)"
    )
    with pytest.raises(AssertionError, match="about to be built"):
        train(compose_train(tmp_path, manifest, proc, [*stop, f"data.val={manifest}"]))


def test_a_checkpoint_exported_into_a_new_folder_leaves_its_config_there(data, tmp_path):
    """docs/training.md's export of a chosen checkpoint: `ckpt_path=<file> trainer.max_steps=<its step>` in a new
    folder loads it, trains no step and exports. The config was written at the training loop's start, which such a
    resume skips: the new folder held an export with no record of the settings it came from."""
    proc, manifest = data
    first = compose_train(tmp_path / "a", manifest, proc, ["trainer.max_steps=1", "export=false"])
    train(first)
    last = tmp_path / "a" / "run" / "checkpoints" / "last.ckpt"
    again = compose_train(tmp_path / "b", manifest, proc, ["trainer.max_steps=1", f"ckpt_path={last}"])
    _, objects = train(again)
    run = tmp_path / "b" / "run"
    assert objects["trainer"].global_step == 1 and (run / "export" / "model.safetensors").is_file()
    saved = OmegaConf.load(run / ".hydra" / "config.yaml")
    assert saved.ckpt_path == str(last) and saved.trainer.max_steps == 1
