"""Where and how a process runs: device and dtype resolution, memory checks, CPU allocator and oneDNN tuning.

One table of dtype names (`DTYPES`, with its aliases) serves every entry point: `from_pretrained(dtype=...)`,
`infer.py` and `eval.py`. Only torch and the standard library are imported here (psutil lazily).
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import warnings
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


class RuntimeConfigError(ValueError):
    """A device, dtype or memory setting that cannot work here (the message names the setting and the value)."""


# name or alias -> dtype. Canonical names are the torch ones; `torch.` prefixes are stripped before lookup.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
    "fp32": torch.float32,
    "float": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "half": torch.float16,
}
_CANONICAL = sorted(k for k, v in DTYPES.items() if k == str(v).replace("torch.", ""))

# `auto` on CPU keeps float32 only when its weights leave this much of the available memory for activations,
# the KV cache and the rest of the process.
CPU_FLOAT32_HEADROOM = 1.25


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A dtype from its name or alias (`bfloat16`, `bf16`, `torch.float32`...); None for None or `auto`."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    name = str(dtype).replace("torch.", "")
    if name == "auto":
        return None
    if name not in DTYPES:
        raise RuntimeConfigError(f"dtype={name!r}: expected one of {_CANONICAL} or 'auto'")
    return DTYPES[name]


def available_memory(device: torch.device) -> int | None:
    """Bytes `device` can still allocate: CUDA's free memory; on CPU the system's available memory, lowered to a
    cgroup (container) limit minus its usage when one is set. None when unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        import psutil

        free = int(psutil.virtual_memory().available)
    except Exception:  # pragma: no cover - psutil is a requirement; a sandbox may still refuse it
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit.isdigit():
            free = min(free, int(limit) - used)
    except (OSError, ValueError):
        pass
    return free


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """`auto` (or None) = cuda when available else cpu; a CUDA (or MPS) device must exist here. Other device
    types torch knows (`meta` holds no data, `xla`, ...) are refused: nothing here runs a model on them."""
    device = "auto" if device is None else str(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise RuntimeConfigError(f"device={device!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeConfigError(
            f"device={device!r} but MPS (Apple GPU) is not available here; use device=cpu"
        )
    if dev.type not in ("cpu", "cuda", "mps"):
        raise RuntimeConfigError(f"device={device!r}: expected auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeConfigError(f"device={device!r} but CUDA is not available here; use device=cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise RuntimeConfigError(
            f"device={device!r} but this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    return dev


def resolve_device_dtype(
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    num_parameters: int | None = None,
    quantize: str | None = None,
) -> tuple[torch.device, torch.dtype]:
    """`auto` device = cuda when available else cpu; `auto` dtype = bfloat16 on CUDA, float32 on CPU, and
    bfloat16 everywhere with `quantize` (int8 / int4 linears: the rest of the model and the activations in bf16).

    With `num_parameters`, the weights must fit in the device's available memory (:func:`available_memory`):
    `auto` on CPU falls back to bfloat16 when float32 weights would not leave room (the released 8.27 B
    checkpoint needs 33 GB in float32, 16.5 GB in bfloat16), and a dtype whose weights alone exceed the memory
    is refused here, with the numbers, rather than by the kernel's out-of-memory killer mid-load. Quantized
    weights count one byte (int8) or half a byte (int4) per parameter (the planner counts the rest exactly).
    """
    dev = resolve_device(device)
    dt = parse_dtype(dtype)
    free = available_memory(dev) if num_parameters else None
    if dt is None and quantize:
        dt = torch.bfloat16
    if dt is None:
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
        if dt == torch.float32 and free is not None and 4 * num_parameters * CPU_FLOAT32_HEADROOM > free:
            logger.info(
                "dtype=auto: float32 weights (%s) would not fit in the %s of memory available, using bfloat16",
                _gb(4 * num_parameters),
                _gb(free),
            )
            dt = torch.bfloat16
    if free is not None:
        per = {"int8": 1, "int4": 0.5}.get(quantize or "", torch.empty((), dtype=dt).element_size())
        need = int(num_parameters * per)
        if need > free:
            hint = " (try dtype=bfloat16, half the size)" if dt == torch.float32 else ""
            name = str(dt).replace("torch.", "")
            raise RuntimeConfigError(
                f"the model's weights need {_gb(need)} in {name} but {dev} has {_gb(free)} available{hint}"
            )
    return dev, dt


# ---------------------------------------------------------------------------------------------- CPU tuning
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)


def set_threads(threads: int | None) -> None:
    """`torch.set_num_threads(threads)`; None keeps torch's default (one per core)."""
    if threads is None:
        return
    if isinstance(threads, bool) or not str(threads).isdigit() or int(threads) < 1:
        raise RuntimeConfigError(f"threads must be an integer >= 1 or null, got {threads!r}")
    torch.set_num_threads(int(threads))


def tune_cpu_allocator() -> bool:
    """Keep freed CPU tensor memory in the process instead of handing it back to the kernel (glibc only).

    By default glibc serves blocks over its mmap threshold with fresh `mmap`s and trims the heap top after frees,
    so a training step that allocates and frees the same activation-sized blocks (MBs each) page-faults on every
    one of them again, zeroing pages each time. Measured on the main job (2 cores, bf16): a float32 softmax over
    (32, 413, 413) scores took 18 ms instead of 4 ms, and a whole training step took ~10% longer. Raising the mmap
    threshold to its maximum (32 MiB) and the trim threshold to 1 GiB makes the heap reuse those pages; the cost
    is up to 1 GiB of freed memory kept in the process. Set `MUSICFLAMINGO_TUNE_MALLOC=0` to leave glibc alone.
    Returns whether the settings were applied.
    """
    if os.environ.get("MUSICFLAMINGO_TUNE_MALLOC", "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # pragma: no cover - glibc without the usual soname
        return False
    ok_mmap = libc.mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)
    ok_trim = libc.mallopt(_M_TRIM_THRESHOLD, 1024 * 1024 * 1024)
    return bool(ok_mmap and ok_trim)


ONEDNN_CACHE_CAPACITY = 256
# oneDNN's own primitive cache, and ideep's (the layer between torch and oneDNN), which keeps primitives alive too.
_ONEDNN_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def limit_onednn_cache(capacity: int = ONEDNN_CACHE_CAPACITY) -> str:
    """Cap the two caches of compiled oneDNN primitives (1024 entries each by default) at `capacity`, each unless
    its variable (`ONEDNN_PRIMITIVE_CACHE_CAPACITY`, `LRU_CACHE_CAPACITY`) is already set.

    On CPU, bf16 matmuls and convolutions run through oneDNN, which compiles a primitive for every new shape
    (~1 ms) and keeps it, with its buffers, in both caches (~0.4-0.7 MB per shape, measured). Training batches
    and prompts change shape all the time, so with the defaults memory grows for the first ~1000 shapes; a cap on
    only one cache does not stop it (900 new matmul shapes: +381 MB with oneDNN's alone at 32, +36 MB with both at
    32). The cap must hold one training step's shapes, or every step compiles them again: the bench's bf16 step
    uses 96 distinct primitives, and with 32 entries it recreated 97 of them per step (32 ms of a ~1 s step).
    Main job, 150 steps, 1 thread: 256 in both caches, 1.88 GB peak RSS and 2770 tokens/s, against 1.97 GB and
    2689 with oneDNN's alone at 32. Both libraries read their variable when they first build a primitive, so
    this works as long as none has been built yet. Returns oneDNN's capacity in effect.
    """
    for name in _ONEDNN_CACHE_VARIABLES:
        os.environ.setdefault(name, str(capacity))
    return os.environ[_ONEDNN_CACHE_VARIABLES[0]]


def tune_cpu() -> None:
    """What every entry point does first: :func:`tune_cpu_allocator` and :func:`limit_onednn_cache`."""
    tune_cpu_allocator()
    limit_onednn_cache()


# ---------------------------------------------------------------------------------------------- terminal output
def stderr_is_terminal() -> bool:
    """True when stderr is an interactive terminal: progress bars redraw well there; in a file or a pipe their
    carriage-return updates are noise, so bars are off and progress goes to log lines."""
    try:
        return os.isatty(2)
    except OSError:
        return False


def clock(seconds: float) -> str:
    """`seconds` as a progress line's time: "0:07", "12:34", "1:02:03" (hours only when there are some)."""
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


# ---------------------------------------------------------------------------------------------- library noise
# Library messages we know to be harmless on our setups, each with why. They look like errors to a newcomer.
KNOWN_HARMLESS_WARNINGS = (
    # Lightning 2.5's pytree helper calls an API torch >= 2.10 deprecated; nothing we can change.
    r".*isinstance\(treespec, LeafSpec\)` is deprecated",
    # The model summary's size estimate assumes 32-bit weights under bf16-mixed: only that estimate is off.
    r"Precision bf16-mixed is not supported by the model summary",
    # Lightning warns that manual optimization skips ModelCheckpoint's per-step logic (GRPO saves its own way).
    r"Using ModelCheckpoint with manual optimization",
    # Every resume writes into the run's own checkpoints/ (a fresh start there is refused before Lightning looks).
    r"Checkpoint directory .* exists and is not empty",
    # A small data set (fewer batches an epoch than trainer.log_every_n_steps): the rows are still logged every
    # log_every_n_steps steps, counted across epochs; only a per-epoch view would lack them, which we never show.
    r"The number of training batches \(\d+\) is smaller than the logging interval",
)


def quiet_known_warnings() -> None:
    """Silence :data:`KNOWN_HARMLESS_WARNINGS` and Lightning's advertising tips (its ``litmodels``/``litlogger``
    hints): every other warning still shows."""
    for pattern in KNOWN_HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)

    class _NoTips(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "💡 Tip" not in record.getMessage()

    for name in ("lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_NoTips())
    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge-score's "Using default tokenizer."


def one_lightning_log_line() -> None:
    """Lightning's top package adds its own console handler ("INFO: ...") and still propagates to the root logger,
    so with our logging (or Hydra's) configured every Lightning message prints twice: drop its handler then.
    Call after Lightning is imported."""
    lightning = logging.getLogger("lightning")
    if logging.getLogger().hasHandlers():
        for handler in [h for h in lightning.handlers if type(h) is logging.StreamHandler]:
            lightning.removeHandler(handler)
