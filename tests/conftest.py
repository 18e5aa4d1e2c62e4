"""Test-wide settings: deterministic, offline, small thread pools (the CI machine has 2 cores)."""

import ipaddress
import os
import socket
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# Under `pytest -n N` (make test) the N workers share the cores: each takes its share.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // _WORKERS))


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_threads():
    """`train(cfg)` with `threads=N` sets the process-wide torch thread count: put the test-wide value back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# Offline means offline: any test of this process that looks up or connects to a host other than this machine fails
# (an audit hook sees every socket connect and name lookup, whoever makes it: our code or a library's).
_REACHED: list[str] = []
_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", socket.gethostname()}


def _is_local(host: object) -> bool:
    if host is None or host == "" or host in _LOCAL_NAMES:
        return True
    try:
        address = ipaddress.ip_address(str(host).split("%")[0])
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def _audit(event: str, args: tuple) -> None:
    if event == "socket.connect":
        sock, address = args
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address[0]):
            _REACHED.append(f"connect to {address}")
    elif event == "socket.getaddrinfo" and not _is_local(args[0]):
        _REACHED.append(f"name lookup of {args[0]!r}")


sys.addaudithook(_audit)


@pytest.fixture(autouse=True)
def _offline():
    yield
    if _REACHED:
        reached = sorted(set(_REACHED))
        _REACHED.clear()
        pytest.fail(f"this test reached the network: {reached}")


@pytest.fixture(scope="session")
def ddp_four_steps(tmp_path_factory):
    """One `train.py trainer=ddp` run on 2 CPU processes (gloo): 4 steps of 800-token batches over 8 tone clips,
    every step logged to CSV, no export: (run folder, its CompletedProcess, processor, manifest). The DDP tests of
    test_train.py and test_train_journey.py read it (one launch for both); none of them changes the run folder."""
    import subprocess
    from pathlib import Path

    from train_fixtures import TINY_OVERRIDES, write_dataset, write_processor

    root = tmp_path_factory.mktemp("ddp_four_steps")
    proc, manifest = write_processor(root / "proc"), write_dataset(root / "data", n=8)
    run = root / "ddp"
    repo = Path(__file__).resolve().parents[1]
    cmd = [
        sys.executable,
        str(repo / "train.py"),
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.max_steps=4",
        "export=false",
        "trainer.log_every_n_steps=1",
        "data.batch_max_tokens=800",
        "model.scheduler.max_steps=8",
        f"data.train={manifest}",
        f"data.processor={proc}",
        f"+model.net.overrides={TINY_OVERRIDES}",
        f"hydra.run.dir={run}",
        f"paths.log_dir={root / 'logs'}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return run, out, proc, manifest


# The reference processor beside ours, built from one tiny folder per test module (tests/test_processor*.py): `ref` is
# transformers' MusicFlamingoProcessor, `ours` musicflamingo's, both from `ref_dir`.
@pytest.fixture(scope="module")
def ref_dir(tmp_path_factory):
    from tiny_assets import write_reference_processor

    d = tmp_path_factory.mktemp("ref_proc")
    write_reference_processor(d)
    return d


@pytest.fixture(scope="module")
def ref(ref_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.MusicFlamingoProcessor.from_pretrained(str(ref_dir))


@pytest.fixture(scope="module")
def ours(ref_dir):
    from musicflamingo.processor import MusicFlamingoProcessor

    return MusicFlamingoProcessor.from_pretrained(ref_dir)
