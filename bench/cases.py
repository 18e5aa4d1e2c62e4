"""Benchmark cases, ours vs the reference (`transformers`), run inside one worker process per job (see run.py).

A job is a JSON-able dict with a `kind` (`prepare`, `hardware`, `parity`, `train`, `prefill`, `decode`,
`features`, `load`) and a `mode`:
* `time`: build BOTH implementations from the same checkpoint in this process, warm each up, then alternate
  ours/ref (the order flips every round) for `repeats` rounds and report the median of each;
* `mem`: build ONE implementation (`impl`) in a fresh process and report its peak memory: on CPU the process's
  `ru_maxrss` minus its RSS before the model was built (imports excluded), on CUDA `max_memory_allocated`.
Every case returns plain floats so the parent can tabulate them.
"""

from __future__ import annotations

import gc
import math
import resource
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from statistics import median
from typing import Any

import numpy as np
import psutil
import torch
import torch.nn.functional as F
from flops import matmul_ceiling, training_flops

from musicflamingo import MusicFlamingo, MusicFlamingoConfig
from musicflamingo.audio.features import LogMelExtractor, split_windows
from musicflamingo.engine import stream_generate
from musicflamingo.model.lora import QuantizedLinear

SR = 16000
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------- configs
def bench_config(kind: str, quick: bool = False) -> MusicFlamingoConfig:
    """The model each case uses.

    `train`/`decode`: the `small` preset (3 s windows, 75 audio tokens each). `prefill`: `small` with 30 s
    windows (`max_source_positions=1500`, 750 tokens each) and 2 encoder + 1 decoder layers, so 20 min of audio
    (40 windows, 30 000 audio tokens, ~15 s per prefill on one core) stays affordable. `load`: about 1 GB in bf16. `--quick` uses
    `tiny` with 4 s windows and one encoder and one decoder layer everywhere (and `small` for `load`).
    """
    if kind == "parity":
        return MusicFlamingoConfig.from_name("tiny", audio=dict(hidden_size=80, num_attention_heads=4))
    if kind == "load":
        if quick:
            return MusicFlamingoConfig.from_name("small")
        return MusicFlamingoConfig.from_name(
            "small",
            audio=dict(
                hidden_size=512,
                num_hidden_layers=4,
                num_attention_heads=8,
                intermediate_size=2048,
                max_source_positions=1500,
            ),
            text=dict(
                vocab_size=32768,
                hidden_size=1536,
                intermediate_size=8960,
                num_hidden_layers=8,
                num_attention_heads=12,
                num_key_value_heads=2,
            ),
            name="bench-1gb",
        )
    # 4 s windows (100 audio tokens each) keep the smoke test in seconds; one layer on each side: the compiled
    # cases build one graph per stack and dtype (a second decoder layer took a graph of its own: the last one's)
    if quick:
        return MusicFlamingoConfig.from_name(
            "tiny",
            audio=dict(max_source_positions=200, num_hidden_layers=1),
            text=dict(num_hidden_layers=1),
            name="tiny-4s",
        )
    if kind == "prefill":
        return MusicFlamingoConfig.from_name(
            "small",
            audio=dict(max_source_positions=1500, num_hidden_layers=2),
            text=dict(num_hidden_layers=1, max_position_embeddings=65536),
            name="small-30s-shallow",
        )
    return MusicFlamingoConfig.from_name("small")


def describe(config: MusicFlamingoConfig) -> str:
    """One line naming the model a case used (presets change; the table should say what was measured)."""
    a, t = config.audio, config.text
    return (
        f"{config.name}: {config.window_seconds:g} s windows ({a.tokens_per_window} audio tokens each), "
        f"encoder {a.num_hidden_layers}x{a.hidden_size}, decoder {t.num_hidden_layers}x{t.hidden_size} "
        f"(vocab {t.vocab_size}), {config.num_parameters() / 1e6:.1f}M params"
    )


def prepare_checkpoint(job: dict) -> dict:
    """Random weights for `job["config"]` (an HF dict) saved with our `save_pretrained` in `job["dtype"]`."""
    config = MusicFlamingoConfig.from_hf_dict(job["config"])
    dtype = DTYPES[job["dtype"]]
    torch.manual_seed(job.get("seed", 0))
    if job.get("fast_init"):  # ~1 GB: skip kaiming init, values do not matter for load timing
        with torch.device("meta"):
            model = MusicFlamingo(config)
        model.to_empty(device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.02)
        model.reset_buffers("cpu")
    else:
        model = MusicFlamingo(config)
        with torch.no_grad():  # norms at 1 and biases at 0 would hide mistakes: perturb them
            for name, p in model.named_parameters():
                if name.endswith("bias") or "norm" in name:
                    p.add_(torch.randn_like(p) * 0.1)
    model.to(dtype)
    model.save_pretrained(job["path"], max_shard_size=job.get("max_shard_size", "5GB"))
    nbytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    return {"weights_bytes": float(nbytes), "params": float(config.num_parameters())}


def load_ours(path: str, dtype: torch.dtype, device: torch.device) -> MusicFlamingo:
    return MusicFlamingo.from_pretrained(path, dtype=dtype, device=device)


def load_ref(path: str, dtype: torch.dtype, device: torch.device) -> Any:
    from transformers import MusicFlamingoForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    return MusicFlamingoForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()


def _ref_class() -> None:
    # Resolve transformers' lazy modules before a memory baseline is taken.
    from transformers import MusicFlamingoForConditionalGeneration, WhisperFeatureExtractor  # noqa: F401


def warm_runtime() -> None:
    """Trigger torch's lazy imports before a memory baseline, so peaks measure tensors, not code.

    The first non-reentrant `torch.utils.checkpoint` call alone imports ~900 modules (torch._dynamo, sympy,
    mpmath: ~180 MB RSS). Neither implementation calls it in these cases any more (ours used to, in the chunked
    loss; it remains for gradient checkpointing and LoRA heads), but both memory workers pay it here, before the
    baseline, so a later first use cannot count as activation memory.
    """
    x = torch.randn(4, 8, requires_grad=True)
    y = torch.utils.checkpoint.checkpoint(lambda a: a * 2, x, use_reentrant=False)
    q = y[None, None]
    F.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
    opt = torch.optim.AdamW([x])
    opt.step()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (x @ x.T).sum()


# ---------------------------------------------------------------------------------------------- inputs
def _text_ids(config: MusicFlamingoConfig, n: int, g: torch.Generator) -> list[int]:
    special = {
        config.audio_token_id,
        config.audio_bos_token_id,
        config.audio_eos_token_id,
        config.text.eos_token_id,
        config.text.pad_token_id,
        config.text.bos_token_id,
    }
    hi = min(config.text.vocab_size, 290) if config.text.vocab_size < 1000 else config.text.vocab_size
    ids = torch.randint(7, hi, (n,), generator=g).tolist()
    return [7 if i in special else i for i in ids]


def audio_batch(
    config: MusicFlamingoConfig, windows_per_row: list[int], text_per_row: list[int], seed: int = 0
) -> dict[str, torch.Tensor]:
    """Rows `3 text, <audio_bos>, <sound> * 750 per window, <audio_eos>, text`, left-padded; full windows only.

    Returns input_ids / attention_mask (B, S), input_features (W, mel, 2P) float32, input_features_mask (W, 2P)
    int32, and labels (B, S) on the trailing text only.
    """
    g = torch.Generator().manual_seed(seed)
    per_window = config.audio.tokens_per_window
    rows, label_rows = [], []
    for n_win, n_text in zip(windows_per_row, text_per_row):
        audio = [config.audio_bos_token_id] + [config.audio_token_id] * (per_window * n_win)
        head = _text_ids(config, 3, g) + audio + [config.audio_eos_token_id]
        tail = _text_ids(config, n_text, g)
        rows.append(head + tail)
        label_rows.append([-100] * len(head) + tail)
    S = max(len(r) for r in rows)
    pad = config.text.pad_token_id or 0
    ids = torch.full((len(rows), S), pad, dtype=torch.long)
    attn = torch.zeros((len(rows), S), dtype=torch.long)
    labels = torch.full((len(rows), S), -100, dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, label_rows)):
        ids[i, S - len(r) :], attn[i, S - len(r) :] = torch.tensor(r), 1
        labels[i, S - len(r) :] = torch.tensor(lab)
    W, frames = sum(windows_per_row), config.audio.mel_frames
    feats = 0.5 * torch.randn(W, config.audio.num_mel_bins, frames, generator=g)
    mask = torch.ones(W, frames, dtype=torch.int32)
    return {
        "input_ids": ids,
        "attention_mask": attn,
        "input_features": feats,
        "input_features_mask": mask,
        "labels": labels,
    }


def windows_for(config: MusicFlamingoConfig, seconds: float) -> int:
    return max(1, math.ceil(seconds / config.window_seconds - 1e-9))


def _to(batch: dict[str, torch.Tensor], device: torch.device, feat_dtype: torch.dtype) -> dict:
    out = {k: v.to(device) for k, v in batch.items()}
    if "input_features" in out:
        out["input_features"] = out["input_features"].to(feat_dtype)
    return out


# ---------------------------------------------------------------------------------------------- timing
class Clock:
    """Wall time of a block; on CUDA measured with events after a synchronize (warm-up is the caller's job)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds = 0.0

    def __enter__(self) -> Clock:
        if self.cuda:
            torch.cuda.synchronize()
            self._start, self._end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self._end.record()
            self._end.synchronize()
            self.seconds = self._start.elapsed_time(self._end) / 1e3
        else:
            self.seconds = time.perf_counter() - self._t0


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    # Linux reports KiB; the kernel's high-water mark can lag the current RSS slightly, so take the max.
    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, rss_bytes())


# A setup returns `step() -> dict of floats`; `seconds` is the timed quantity unless the step says otherwise.
Setup = Callable[[str, dict, torch.device], Callable[[], dict]]


def setup_train(impl: str, job: dict, device: torch.device) -> Callable[[], dict]:
    """One optimizer step: forward (+ autocast for bf16) -> backward -> AdamW step -> zero_grad. `compile`: ours
    with every encoder and decoder layer compiled (traced in the warm-up)."""
    load = load_ours if impl == "ours" else load_ref
    model = load(job["path"], torch.float32, device).train()
    if impl == "ours" and job.get("compile"):  # what `model.net.compile=true` does in train.py
        model.compile_layers()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    config = MusicFlamingoConfig.from_hf_dict(job["config"])
    w = windows_for(config, job["audio_seconds"])
    batch = audio_batch(config, [w] * job["batch"], [job["text_tokens"]] * job["batch"], seed=1)
    batch = _to(batch, device, torch.float32)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if job["dtype"] == "bf16" else nullcontext()
    tokens = float(batch["attention_mask"].sum())

    def step() -> dict:
        with Clock(device) as c:
            with autocast:
                if impl == "ours":
                    loss = model(**batch, return_logits=False).loss
                else:
                    loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            value = float(loss.detach())
        return {"seconds": c.seconds, "loss": value, "tokens": tokens}

    return step


def _generate_inputs(job: dict, device: torch.device, dtype: torch.dtype) -> tuple[MusicFlamingoConfig, dict]:
    config = MusicFlamingoConfig.from_hf_dict(job["config"])
    w = windows_for(config, job["audio_seconds"])
    b = job.get("batch", 1)
    text = [job.get("text_tokens", 16) + 2 * i for i in range(b)]  # rows of different length: left padding
    batch = audio_batch(config, [w] * b, text, seed=2)
    batch.pop("labels")
    return config, _to(batch, device, dtype)


def random_model(config: MusicFlamingoConfig, device: torch.device) -> MusicFlamingo:
    """Ours with `config`'s exact shapes, bf16 on `device`, normal(0, 0.02) weights drawn in parameter order from
    seed 0: values do not matter for speed, only that they are finite. Nothing is allocated twice (meta first)."""
    with torch.device("meta"):
        model = MusicFlamingo(config)
    model.to_empty(device=device)
    model.to(torch.bfloat16)
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=g)
    model.reset_buffers(device)
    return model.eval()


def release_inputs(
    config: MusicFlamingoConfig, seconds: float, batch: int, text: int = 16, labels: bool = False
) -> dict:
    """`batch` rows of `seconds` of audio (whole windows) and `text` trailing tokens, bf16 features, on CPU (with
    `labels`: on the trailing text, for a training step); seconds 0: 64 text tokens per row (decode at batch B: the
    steps read the weights, a long audio prompt would only add prefill)."""
    if seconds <= 0:
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, min(config.text.vocab_size, config.audio_token_id), (batch, 64), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    w = windows_for(config, seconds)
    inputs = audio_batch(config, [w] * batch, [text] * batch, seed=1)
    if not labels:
        inputs.pop("labels")
    inputs["input_features"] = inputs["input_features"].to(torch.bfloat16)
    return inputs


def greedy_generate(
    impl: str, model: Any, inputs: dict, n: int, pad: int, streamer: Any = None, compile: bool = False
) -> torch.Tensor:
    """Exactly `n` greedy tokens from the reference (`impl` "ref") or ours (any other `impl`: bf16, int8, int4; no
    stop ids; `compile`: its compiled decode step)."""
    if impl == "ref":
        return _ref_generate(model, inputs, n, pad, streamer)
    return model.generate(**inputs, max_new_tokens=n, stop_token_ids=[], compile=compile)


def kept_for_backward(fn: Callable[[], Any], exclude: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd keeps while `fn()` builds its graph, those of `exclude` (weights,
    inputs) left out. Shared by bench/packed_attention.py and the planner's tests."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


class Int8StandIn(QuantizedLinear):
    """A CPU stand-in for bitsandbytes' NF4 `Linear4bit` (QLoRA's frozen base): int8 weights with a per-row scale,
    dequantised in the forward. Lets the QLoRA code paths (adapters over a quantized base, merge into bf16) run
    where bitsandbytes cannot: the tests and the GPU bench's CPU smoke run."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        scale = weight.abs().amax(1, keepdim=True).clamp_min(1e-8) / 127
        self.register_buffer("qweight", torch.round(weight / scale).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> Int8StandIn:
        return cls(linear.weight.detach(), linear.bias)

    def dequantize(self) -> torch.Tensor:
        return self.qweight.to(self.scale.dtype) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize().to(x.dtype), bias)


def _ref_generate(model: Any, inputs: dict, n: int, pad: int, streamer: Any = None) -> torch.Tensor:
    return model.generate(
        **inputs,
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=pad,
        streamer=streamer,
    )


def setup_prefill(impl: str, job: dict, device: torch.device) -> Callable[[], dict]:
    """Time to first token: `generate(max_new_tokens=1)` = audio encoding + prefill + one argmax."""
    dtype = DTYPES[job["dtype"]]
    config, inputs = _generate_inputs(job, device, dtype)
    model = (load_ours if impl == "ours" else load_ref)(job["path"], dtype, device)
    pad = config.text.pad_token_id or 0

    def step() -> dict:
        with Clock(device) as c:
            if impl == "ours":
                out = model.generate(**inputs, max_new_tokens=1, stop_token_ids=[])
            else:
                out = _ref_generate(model, inputs, 1, pad)
        return {"seconds": c.seconds, "first_token": float(out[0, -1])}

    return step


class _TimingStreamer:
    """transformers `BaseStreamer`: `put` is called with the prompt, then once per new token (B,)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times = device, []

    def put(self, value: torch.Tensor) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def setup_decode(impl: str, job: dict, device: torch.device) -> Callable[[], dict]:
    """Decode-only tokens/s: time from the first new token to the last, `B * (N - 1)` tokens in between.

    Prefill is excluded by timestamping every new token (ours: each `stream_generate` yield; reference: a
    streamer's `put`, which `generate` calls after every step) and keeping the span first -> last.
    """
    dtype = DTYPES[job["dtype"]]
    config, inputs = _generate_inputs(job, device, dtype)
    model = (load_ours if impl == "ours" else load_ref)(job["path"], dtype, device)
    n, b = job["new_tokens"], inputs["input_ids"].shape[0]
    pad = config.text.pad_token_id or 0
    compile_steps = bool(job.get("compile"))  # ours only: the warm-up run traces the compiled step

    def step() -> dict:
        t0 = time.perf_counter()
        if impl == "ours":
            stamps, toks = [], []
            steps = stream_generate(
                model, **inputs, max_new_tokens=n, stop_token_ids=[], compile=compile_steps
            )
            for tok in steps:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                stamps.append(time.perf_counter())
                toks.append(tok)
            last = toks[-1]
        else:
            streamer = _TimingStreamer(device)
            out = _ref_generate(model, inputs, n, pad, streamer)
            stamps, last = streamer.times[1:], out[:, -1]  # times[0] is the prompt
        if len(stamps) != n:
            raise RuntimeError(f"{impl}: expected {n} new tokens, got {len(stamps)}")
        decode = stamps[-1] - stamps[0]
        return {
            "seconds": decode,
            "tokens_per_s": b * (n - 1) / decode,
            "total_s": stamps[-1] - t0,
            "last_token_sum": float(last.sum()),
        }

    return step


def setup_features(impl: str, job: dict, device: torch.device) -> Callable[[], dict]:
    """Log-mel of `audio_seconds` of noise cut into 30 s windows: ours batched vs WhisperFeatureExtractor."""
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(int(job["audio_seconds"] * SR))).astype(np.float32)
    windows = split_windows(audio, max_audio_len=max(1200.0, job["audio_seconds"]))
    if impl == "ours":
        fe = LogMelExtractor(feature_size=128)

        def extract() -> torch.Tensor:
            # .cpu(): the reference always returns host tensors, so ours pays the copy back too
            return fe(windows, device=device)[0].cpu()
    else:
        from transformers import WhisperFeatureExtractor

        ref = WhisperFeatureExtractor(feature_size=128, return_attention_mask=True)

        def extract() -> torch.Tensor:
            out = ref(
                windows, sampling_rate=SR, return_attention_mask=True, return_tensors="pt", device=device.type
            )
            return out["input_features"]

    def step() -> dict:
        with Clock(device) as c:
            feats = extract()
        return {
            "seconds": c.seconds,
            "audio_s_per_s": job["audio_seconds"] / c.seconds,
            "checksum": float(feats.double().sum()),
        }

    return step


SETUPS: dict[str, Setup] = {
    "train": setup_train,
    "prefill": setup_prefill,
    "decode": setup_decode,
    "features": setup_features,
}


# ---------------------------------------------------------------------------------------------- job modes
def _summary(runs: list[dict]) -> dict:
    keys = runs[0].keys()
    return {k: median(r[k] for r in runs) for k in keys} | {"first": runs[0], "n": len(runs)}


def warm_device_libraries(device: torch.device) -> None:
    """Run an fp32 and a bf16 matmul and an attention call once, so that cuBLAS/cuDNN handles and workspaces
    exist before a memory baseline is taken."""
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 4, 64, 64, device=device, dtype=dtype)
        (x @ x).sum()
        F.scaled_dot_product_attention(x, x, x, is_causal=True).sum()


class AllocatedBytes:
    """Device memory counters for measuring both implementations in one timing worker (CUDA): the allocator's
    bytes in use now, and its high-water mark since `reset()`. A class so tests can stand in for CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def now(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.memory_allocated(self.device)

    def reset(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)


def run_time(job: dict, device: torch.device, memory: AllocatedBytes | None = None) -> dict:
    """Both implementations in this process, alternating ours/ref, medians of `repeats` runs each.

    With `memory` (CUDA: the allocator counts bytes per tensor, so two resident models do not blur each other)
    each implementation's peak is measured here too, saving a worker process per variant: `peak_bytes` = what
    its setup and warm-up left allocated (weights, inputs, optimizer state, caches) + the largest rise above the
    allocation at the start of one of its timed steps. Same quantity as `run_mem`'s build + steps peak, without
    the transient of loading.
    """
    setup = SETUPS[job["kind"]]
    impls = ("ours", "ref")
    resident = dict.fromkeys(impls, 0)
    if memory is not None:
        warm_device_libraries(device)  # their workspaces belong to neither implementation
    steps = {}
    for impl in impls:
        before = memory.now() if memory else 0
        steps[impl] = setup(impl, job, device)
        resident[impl] += memory.now() - before if memory else 0

    def run(impl: str, keep: bool = False) -> dict:
        if memory is None:
            return steps[impl]()
        base = memory.now()
        memory.reset()
        out = steps[impl]()
        out = out | {"step_peak_bytes": float(memory.peak() - base)}
        if keep:  # a warm-up step's lasting allocations (optimizer state, cuBLAS workspace) are the impl's
            resident[impl] += memory.now() - base
        return out

    warm: dict[str, dict] = {}
    for _ in range(job.get("warmup", 1)):
        for impl in impls:
            warm[impl] = run(impl, keep=True)
    runs: dict[str, list[dict]] = {"ours": [], "ref": []}
    for r in range(job["repeats"]):
        order = impls if r % 2 == 0 else impls[::-1]
        for impl in order:
            runs[impl].append(run(impl))
    # The warm-up is the first step of each (same weights, same batch): its outputs are comparable.
    out = {impl: _summary(v) | {"warmup": warm.get(impl, {})} for impl, v in runs.items()}
    if memory is not None:
        for impl in impls:
            out[impl]["peak_bytes"] = float(resident[impl] + max(r["step_peak_bytes"] for r in runs[impl]))
    return out


def run_mem(job: dict, device: torch.device) -> dict:
    """Peak memory of ONE implementation in this (fresh) process: model build + `mem_steps` steps.

    On CUDA `impl` may be "both": the allocator's peak counter is reset per implementation, so one process
    measures ours, frees everything, then the reference (CPU RSS high-water marks cannot be reset: one process
    per implementation there).
    """
    impls = ("ours", "ref") if job["impl"] == "both" else (job["impl"],)
    if len(impls) > 1 and device.type != "cuda":
        raise ValueError("impl='both' needs CUDA (CPU peak RSS cannot be reset within a process)")
    _ref_class()  # both import the same modules, so the baselines match
    warm_runtime()
    results = {}
    for impl in impls:
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = rss_bytes()
        step = SETUPS[job["kind"]](impl, job, device)
        out = {}
        for _ in range(job.get("mem_steps", 1)):
            out = step()
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated() - base
        else:
            peak = peak_rss_bytes() - base
        results[impl] = out | {"peak_bytes": float(peak), "base_bytes": float(base)}
        del step
    return results


def _touch(t: torch.Tensor) -> int:
    """Read one byte per 4 KiB page of a contiguous tensor (forces lazily mapped weights into memory)."""
    flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
    return int(flat[::4096].sum()) + int(flat[-1])


def run_load(job: dict, device: torch.device) -> dict:
    """Load a (sharded) checkpoint once in this fresh process, then read every weight once.

    `transformers` maps safetensors lazily: right after `from_pretrained` most weights are still on disk (or in
    the page cache) and cost no RSS. Reading one byte per 4 KiB page of every weight makes both implementations
    pay for resident weights without allocating temporaries; `seconds` is load + that pass, `load_only_s` the
    load call alone.
    """
    impl, dtype = job["impl"], DTYPES[job["dtype"]]
    _ref_class()
    warm_runtime()
    base = torch.cuda.memory_allocated() if device.type == "cuda" else rss_bytes()
    with Clock(device) as total:
        with Clock(device) as load:
            model = (load_ours if impl == "ours" else load_ref)(job["path"], dtype, device)
        with torch.no_grad():
            checksum = float(sum(_touch(p) for p in model.state_dict().values()))
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = peak_rss_bytes() - base
    nbytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    return {
        impl: {
            "seconds": total.seconds,
            "load_only_s": load.seconds,
            "peak_bytes": float(peak),
            "weights_bytes": float(nbytes),
            "checksum": checksum,
        }
    }


def run_hardware(job: dict, device: torch.device) -> dict:
    out = {}
    for name in ("fp32", "bf16"):
        r = matmul_ceiling(device, DTYPES[name], tuple(job["sizes"]), job["repeats"])
        out[name] = r["flops"]
    return {"ceiling_flops": out}


def run_parity(job: dict, device: torch.device) -> dict:
    """bf16 logits of ours vs the reference on the tiny model (same checkpoint), and fp32 greedy tokens."""
    out = {}
    for name in ("bf16", "fp32"):
        dtype = DTYPES[name]
        ours = load_ours(job["path"], dtype, device)
        ref = load_ref(job["path"], dtype, device)
        config = ours.config
        batch = audio_batch(config, [2, 1], [12, 5], seed=3)
        batch.pop("labels")
        batch = _to(batch, device, dtype)
        with torch.no_grad():
            o = ours(**batch).logits.float()
            r = ref(**batch).logits.float()
        valid = batch["attention_mask"].bool()
        diff = (o - r)[valid].abs().max().item()
        scale = max(r[valid].abs().max().item(), 1.0)
        go = ours.generate(**batch, max_new_tokens=8, stop_token_ids=[])
        gr = _ref_generate(ref, batch, 8, config.text.pad_token_id or 0)
        out[name] = {
            "max_abs_diff": diff,
            "rel_diff": diff / scale,
            "greedy_match": float((go == gr).float().mean()) if go.shape == gr.shape else 0.0,
        }
    return out


def run_job(job: dict) -> dict:
    """Entry point of a worker process."""
    torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    kind = job["kind"]
    if kind == "prepare":
        return prepare_checkpoint(job)
    if kind == "hardware":
        return run_hardware(job, device)
    if kind == "parity":
        return run_parity(job, device)
    if kind == "load":
        return run_load(job, device)
    if job["mode"] == "time":  # several sizes share one process (and one transformers import)
        memory = AllocatedBytes(device) if device.type == "cuda" else None
        return {"variants": [run_time(job | v, device, memory) for v in job.get("variants", [{}])]}
    return run_mem(job, device)


def train_step_flops(job: dict) -> float:
    config = MusicFlamingoConfig.from_hf_dict(job["config"])
    w = windows_for(config, job["audio_seconds"])
    batch = audio_batch(config, [w] * job["batch"], [job["text_tokens"]] * job["batch"])
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    B, S = batch["input_ids"].shape
    return training_flops(config, w * job["batch"], B, S, labelled)
