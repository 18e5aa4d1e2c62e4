"""Command-line errors (review round 10): a configured object whose package is missing is one line naming it."""

import sys
import types

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from musicflamingo.cli import user_error_line


def _error_of(target: str) -> BaseException:
    cfg = OmegaConf.create({"logger": {"mlflow": {"_target_": target}}})
    with pytest.raises(Exception) as err:
        instantiate(cfg.logger.mlflow)
    return err.value


@pytest.fixture
def fakelib(monkeypatch):
    """A library module whose classes import, when built, a package that is not installed (as Lightning's
    MLFlowLogger imports mlflow) or a project module that does not exist (a bug, not an input error)."""
    mod = types.ModuleType("fakelib_review10")
    exec(
        "class Logger:\n    def __init__(self):\n        import mlflow_not_installed_review10\n"
        "class Ours:\n    def __init__(self):\n        import musicflamingo.no_such_module_review10\n",
        mod.__dict__,
    )
    monkeypatch.setitem(sys.modules, "fakelib_review10", mod)
    return mod


def test_a_configured_object_whose_package_is_missing_is_one_line_naming_key_and_package(fakelib):
    line = user_error_line(_error_of("fakelib_review10.Logger"))
    assert line == "logger.mlflow: needs the `mlflow_not_installed_review10` package, which is not installed"


def test_a_missing_project_module_keeps_its_traceback(fakelib):
    assert user_error_line(_error_of("fakelib_review10.Ours")) is None


def test_an_error_listing_its_problems_shows_them_under_its_first_line(tmp_path):
    """A peft folder of another rank: the command line printed only '...: 2 tensor(s) do not fit this model,
    nothing was loaded:', not which tensors or why."""
    from test_export_review10 import _net

    from musicflamingo.checkpoint import CheckpointError
    from musicflamingo.cli import LISTED_PROBLEMS, error_line
    from musicflamingo.model.peft_format import load_peft_adapter, save_peft_adapter

    save_peft_adapter(_net(rank=4), tmp_path / "peft")
    with pytest.raises(CheckpointError) as err:
        load_peft_adapter(_net(rank=8), tmp_path / "peft")
    line = error_line(err.value)
    assert line.splitlines()[0].endswith("nothing was loaded:")
    assert "rank 4 in the file, 8 in this model's adapter" in line, line
    many = CheckpointError("x.safetensors: 30 problems:\n" + "\n".join(f"  key {i}: bad" for i in range(30)))
    shown = error_line(many).splitlines()
    assert len(shown) == LISTED_PROBLEMS + 2 and shown[-1] == f"  ... and {30 - LISTED_PROBLEMS} more"
