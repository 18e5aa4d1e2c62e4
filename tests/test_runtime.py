"""musicflamingo.runtime (device, dtype, memory) and musicflamingo.cli (one-line errors)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import musicflamingo.runtime as runtime
from musicflamingo.cli import user_error_line
from musicflamingo.runtime import RuntimeConfigError, available_memory, parse_dtype, resolve_device_dtype


def test_one_dtype_table_with_aliases():
    for names, dtype in [
        (("float32", "fp32", "float", "torch.float32"), torch.float32),
        (("bfloat16", "bf16", "torch.bfloat16"), torch.bfloat16),
        (("float16", "fp16", "half"), torch.float16),
        (("float64",), torch.float64),
    ]:
        for name in names:
            assert parse_dtype(name) == dtype
            assert resolve_device_dtype("cpu", name)[1] == dtype
    assert (
        parse_dtype(None) is None
        and parse_dtype("auto") is None
        and parse_dtype(torch.float16) == torch.float16
    )
    # a torch dtype object is checked like a name: weights in int8 are no model dtype
    with pytest.raises(RuntimeConfigError, match=r"dtype='int8': expected one of"):
        parse_dtype(torch.int8)
    message = r"dtype='int3': expected one of \['bfloat16', 'float16', 'float32', 'float64'\] or 'auto'"
    with pytest.raises(RuntimeConfigError, match=message):
        parse_dtype("int3")
    with pytest.raises(RuntimeConfigError, match=message):
        resolve_device_dtype("cpu", "int3")


def test_dtype_follows_the_memory_available(monkeypatch, caplog):
    """`dtype=auto` on CPU keeps float32 when its weights fit with room to spare, else bfloat16 (logged); weights
    larger than the available memory are refused, naming both sizes."""
    n = 1_000_000_000  # 4 GB in float32, 2 GB in bfloat16
    free = {"bytes": 64e9}
    monkeypatch.setattr(runtime, "available_memory", lambda device: int(free["bytes"]))
    assert resolve_device_dtype("cpu", "auto", n) == (torch.device("cpu"), torch.float32)
    free["bytes"] = 4.5e9  # float32 would fit, but without the headroom
    with caplog.at_level("INFO", logger="musicflamingo.runtime"):
        assert resolve_device_dtype("cpu", "auto", n)[1] == torch.bfloat16
    assert "would not fit" in caplog.text
    assert resolve_device_dtype("cpu", "float32", n)[1] == torch.float32  # asked for and it fits: allowed
    assert resolve_device_dtype("cpu", "bf16", n)[1] == torch.bfloat16
    free["bytes"] = 3e9
    with pytest.raises(
        RuntimeConfigError, match=r"need 4\.0 GB in float32 but cpu has 3\.0 GB available \(try dtype=bf"
    ):
        resolve_device_dtype("cpu", "float32", n)
    free["bytes"] = 1e9
    with pytest.raises(RuntimeConfigError, match=r"need 2\.0 GB in bfloat16 but cpu has 1\.0 GB available$"):
        resolve_device_dtype("cpu", "auto", n)
    assert resolve_device_dtype("cpu", "float32")[1] == torch.float32  # no parameter count: no check


def test_cuda_index_beyond_the_devices_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(RuntimeConfigError, match=r"device='cuda:3' but this machine has 1 CUDA device"):
        resolve_device_dtype("cuda:3", "auto", 1000)


def test_bad_device_is_a_clear_error():
    with pytest.raises(RuntimeConfigError, match=r"device='gpu': expected auto, cpu, cuda or cuda:N"):
        resolve_device_dtype("gpu")


def test_available_memory_on_cpu_is_positive():
    free = available_memory(torch.device("cpu"))
    assert free is not None and free > 0


def test_runtime_errors_and_deliberate_stops_are_one_line():
    from musicflamingo.data.dataset import TooManyBadSamplesError
    from musicflamingo.errors import RunStopped
    from musicflamingo.lit import NonFiniteLossError

    assert user_error_line(RuntimeConfigError("dtype='x': expected ...")) == "dtype='x': expected ..."
    for cls in (NonFiniteLossError, TooManyBadSamplesError):
        assert issubclass(cls, RunStopped)
        assert user_error_line(cls("stopped: why\ndetails")) == "stopped: why"
    assert user_error_line(RuntimeError("a bug")) is None


def test_cli_and_inference_do_not_import_lightning():
    """The error path of infer.py needs no Lightning (the deliberate stops share `errors.RunStopped`)."""
    code = (
        "import sys, musicflamingo.cli, musicflamingo.inference, musicflamingo.eval.runner, musicflamingo.engine\n"
        "assert 'lightning' not in sys.modules, 'lightning imported'\n"
        "assert 'musicflamingo.lit' not in sys.modules and 'musicflamingo.data.dataset' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_runtime_and_checkpoint_imports_are_one_way():
    """runtime.py imports only torch and the standard library; checkpoint.py never imports the model class (the
    model imports it); neither hides an import inside a function."""
    import ast

    import musicflamingo.checkpoint as checkpoint

    def imports(module) -> tuple[set[str], set[str]]:
        tree = ast.parse(open(module.__file__).read())
        top = {
            n.module if isinstance(n, ast.ImportFrom) else a.name
            for n in tree.body
            if isinstance(n, (ast.Import, ast.ImportFrom))
            for a in n.names
        }
        nested = {
            n.module if isinstance(n, ast.ImportFrom) else n.names[0].name
            for f in ast.walk(tree)
            if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
            for n in ast.walk(f)
            if isinstance(n, (ast.Import, ast.ImportFrom))
        }
        return top, nested

    top, nested = imports(runtime)
    assert not any(m.startswith("musicflamingo") for m in top) and nested <= {"psutil"}
    top, nested = imports(checkpoint)
    ours = {m for m in top if m.startswith("musicflamingo")}
    assert ours == {"musicflamingo.model.config", "musicflamingo.runtime"} and not nested
