"""Review round 18, the benchmarks' smoke runs: the GPU-release reference worker imported peft the plain way
(bitsandbytes asked the Hub for a kernel), and music21's corpus was listed at every chorale selection."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_release_reference_imports_peft_without_the_hub():
    """The reference's LoRA step imports peft, which imports bitsandbytes; a plain `import peft` on an AVX512-BF16
    CPU has bitsandbytes ask the Hugging Face Hub for a kernel ("Failed to load CPU gemm_4bit_forward from
    kernels-community" when offline). gpu_release.import_peft asks nothing. ~15 s: two interpreters import peft."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def child(code: str) -> str:
        run = subprocess.run(
            [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=180
        )
        assert run.returncode == 0, run.stderr[-2000:]
        return run.stderr

    if "kernels-community" not in child("import peft"):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes asks the Hub for nothing")
    err = child(
        "import sys\nsys.path.insert(0, 'bench')\nimport gpu_release\n"
        "LoraConfig, get_peft_model = gpu_release.import_peft()\n"
        "assert LoraConfig.__module__.startswith('peft') and 'bitsandbytes' in sys.modules\n"
    )
    assert "kernels-community" not in err, err[-2000:]


def test_chorale_paths_asks_music21_once(monkeypatch):
    """music21's bundled corpus is listed once per process (0.4 s a call); callers get their own list."""
    pytest.importorskip("music21")
    from musicflamingo.data.synthetic import sources

    calls = []
    real = sources._music21().corpus.getComposer

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(sources._music21().corpus, "getComposer", counting)
    if hasattr(sources, "_bach_paths"):
        sources._bach_paths.cache_clear()
    first = sources.chorale_paths()
    first.append("mutated")
    second = sources.chorale_paths()
    assert len(calls) == 1 and "mutated" not in second
    assert second == sorted(second) == first[:-1] and len(second) > 400
    if hasattr(sources, "_bach_paths"):
        sources._bach_paths.cache_clear()
