"""Review round 10 of the server: `max_cached_tokens` as a bound on the KV cache's memory, and its growth."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
import torch
from test_serve import MODEL, loaded  # noqa: F401  (loaded: a fixture)
from tiny_checkpoint import write_tiny_checkpoint

from musicflamingo.engine import Engine, Request
from musicflamingo.model.layers import KVCache
from musicflamingo.serve import ServeSettings
from musicflamingo.serve.errors import APIError
from musicflamingo.serve.protocol import parse_chat_request, prepare
from musicflamingo.serve.worker import EngineWorker, Job


@pytest.fixture(scope="module")  # the checkpoint test_serve's `loaded` reads
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


def _cache_positions(engine: Engine) -> int:
    """Positions the engine's KV cache holds, from the bytes of its tensors (old and new layouts alike)."""
    per_position = sum(k[0, :, 0].nbytes + v[0, :, 0].nbytes for k, v in engine.cache.layers)
    total = sum(k.nbytes + v.nbytes for k, v in engine.cache.layers)
    if isinstance(getattr(engine.cache, "__dict__", {}).get("keys"), torch.Tensor):  # one 5-d tensor per kind
        total = engine.cache.keys.nbytes + engine.cache.values.nbytes
    return total // per_position


def _prepared(processor, settings, text: str, max_tokens: int):
    req = parse_chat_request(
        {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens}, settings
    )
    return prepare(req, processor, settings, 32768, ())


def test_one_long_request_and_many_short_ones_keep_the_cache_within_max_cached_tokens(loaded):  # noqa: F811
    """`max_cached_tokens` bounded the sum of prompt + max_tokens of live requests, but the cache is one tensor of
    max_batch rows as long as the longest: a 1000-token request beside a 310-token one allocated 4 x 1024
    positions under a bound of 1400. Now every admission keeps rows x capacity within it; answers are unchanged
    (each equals its one-slot run) and the short requests still decode together once the long one is done."""
    model, processor = loaded
    bound = 1400
    settings = ServeSettings(model_name=MODEL, max_batch=4, max_cached_tokens=bound)
    settings.resolve(32768, processor.max_audio_len)
    long = _prepared(processor, settings, "tempo " * 150, 1)
    long = _prepared(processor, settings, "tempo " * 150, 1000 - long.prompt_tokens)
    short = [_prepared(processor, settings, f"question {i}: key?", 12) for i in range(8)]
    prepared = [long, *short]
    assert long.prompt_tokens + long.params.max_new_tokens == 1000
    assert long.prompt_tokens > 500 and all(p.prompt_tokens + 12 < 340 for p in short)

    worker = EngineWorker(model, slots=4, max_cached_tokens=bound)
    engine = worker.engine
    seen = []
    admit, step = engine.admit, engine.step

    def recorded_admit(*args, **kwargs):
        out = admit(*args, **kwargs)
        seen.append(_cache_positions(engine))
        return out

    def recorded_step():
        out = step()
        seen.append(_cache_positions(engine))
        return out

    engine.admit, engine.step = recorded_admit, recorded_step

    async def run() -> list[list[int]]:
        loop = asyncio.get_running_loop()
        jobs = [Job(p, loop) for p in prepared]
        worker.start()
        try:
            for job in jobs:
                worker.submit(job)
            answers = []
            for job in jobs:
                tokens = []
                while True:
                    event = await asyncio.wait_for(job.queue.get(), 120)
                    assert event.error is None, event.error
                    tokens += event.tokens
                    if event.finish:
                        break
                answers.append(tokens)
            return answers
        finally:
            worker.stop()

    answers = asyncio.run(run())
    assert seen and max(seen) <= bound, f"the KV cache held {max(seen)} positions under a bound of {bound}"
    assert worker.stats()["peak_cache_positions"] <= bound
    assert worker.stats()["peak_live"] >= 3  # the short ones still share the batch
    for p, got in zip(prepared, answers):
        alone = Engine(model, slots=1)
        slot = alone.admit(Request(p.input_ids, p.params, p.input_features, p.input_features_mask))
        while alone.decoding:
            alone.step()
        assert got == slot.tokens


def test_fitted_cache_shrinks_after_a_long_request_and_gives_the_same_tokens(loaded):  # noqa: F811
    """A bounded engine drops the rows and positions a finished long request needed (the unbounded cache keeps
    max_batch x its length for good); tokens equal those of an unbounded engine."""
    model, _ = loaded
    long = Request(torch.full((700,), 11), _greedy(40))
    shorts = [Request(torch.arange(5, 25 + i), _greedy(10)) for i in range(3)]
    fitted, plain = Engine(model, slots=4, max_positions=1024), Engine(model, slots=4)
    outputs = []
    for engine in (fitted, plain):
        first = engine.admit(long)
        while engine.decoding:
            engine.step()
        engine.release(first.index)
        slots = [engine.admit(r) for r in shorts]
        while engine.decoding:
            engine.step()
        outputs.append([first.tokens] + [s.tokens for s in slots])
    assert outputs[0] == outputs[1]
    assert fitted.cache.rows * fitted.cache.capacity <= 1024 and fitted.cache.rows == 3
    assert fitted.cache.capacity < 700 and plain.cache.capacity >= 768


def test_bounded_engine_keeps_finished_slots_within_the_bound_in_bfloat16(ckpt):
    """Finished slots that stay (chat, `generate`) write one position past their answer in later steps; the
    bounded cache counts it, never grows past its bound, and CPU bfloat16 steps (whole key blocks under the mask,
    the capacity not a whole block here) give the tokens of an unbounded engine."""
    from musicflamingo import MusicFlamingo

    model = MusicFlamingo.from_pretrained(ckpt, dtype=torch.bfloat16, device="cpu").eval()
    g = torch.Generator().manual_seed(0)
    sizes = [(300, 30), (150, 40), (40, 60), (310, 20)]
    reqs = [Request(torch.randint(10, 290, (n,), generator=g), _greedy(m)) for n, m in sizes]
    bound = 4 * 330  # the longest: 310 + 20
    plain, fitted = Engine(model, slots=4), Engine(model, slots=4, max_positions=bound)
    assert fitted.blocked
    outputs = []
    for engine in (plain, fitted):
        slots = [engine.admit(r) for r in reqs]
        while engine.decoding:
            engine.step()
            assert engine is plain or engine.cache.rows * engine.cache.capacity <= bound
        outputs.append([s.tokens for s in slots])
    assert fitted.cache.capacity == 330 and outputs[0] == outputs[1]


def _greedy(n: int):
    from musicflamingo.engine import SamplingParams

    return SamplingParams(max_new_tokens=n, stop_ids=())


def test_a_request_past_the_bound_alone_is_a_400_naming_max_cached_tokens(loaded):  # noqa: F811
    """A compiled engine keeps a row for every slot, so one request may hold max_cached_tokens / max_batch
    positions: a request the engine could never admit is refused up front naming the setting (it was accepted
    and left to fail in the worker)."""
    _, processor = loaded
    settings = ServeSettings(model_name=MODEL, max_batch=2, max_cached_tokens=800, compile=True)
    settings.resolve(32768, processor.max_audio_len)
    assert _prepared(processor, settings, "key?", 50).params.max_new_tokens == 50  # a 298-token prompt
    with pytest.raises(APIError) as e:
        _prepared(processor, settings, "key?", 150)
    body = e.value.body()["error"]
    assert (
        e.value.status == 400 and body["param"] == "max_tokens" and body["code"] == "context_length_exceeded"
    )
    assert "max_cached_tokens of 800 over max_batch=2 compiled slots (400)" in body["message"]


def _rss_mib() -> tuple[int, int]:
    status = Path("/proc/self/status").read_text()
    return tuple(int(re.search(rf"{k}:\s+(\d+)", status).group(1)) // 1024 for k in ("VmRSS", "VmHWM"))


def test_kv_cache_growth_holds_one_old_layer_beside_the_new_cache():
    """`grow` held the whole old cache beside the whole new one (a 5-d tensor for all layers): doubling peaked at
    old + new. Per-layer tensors hold one old tensor at a time: the peak is the new cache plus 1/(2 x layers) of
    the old. Measured as the bytes malloc has handed out (tests/test_planner.py's `measured_peak`; the process's
    resident memory moved with what earlier tests had freed)."""
    from test_planner import measured_peak

    layers, mib = 8, 2**20
    caches = [KVCache(layers, 4, 2048, 2, 64, torch.float32, "cpu") for _ in range(2)]  # 64 MiB each
    for cache in caches:
        for k, v in cache.layers:  # contents to keep
            k.fill_(1.0)
            v.fill_(2.0)
    grown = []

    def grow() -> None:  # measured_peak runs it twice
        cache = caches.pop()
        cache.grow(4096)  # 128 MiB new, 64 MiB old freed
        grown.append(cache)

    extra = measured_peak(grow) / mib  # old code: the whole new cache on top of the old one, 128 MiB
    assert 0.95 * 64 <= extra <= 64 + 64 / (2 * layers) + 2, (
        f"growth peaked {extra:.1f} MiB over the old cache"
    )
    k, v = grown[-1].layers[-1]
    assert k[:, :, :2048].eq(1).all() and v[:, :, :2048].eq(2).all() and k[:, :, 2048:].eq(0).all()


def test_compiled_server_with_fewer_cached_tokens_than_slots_is_refused_naming_both():
    """A compiled engine keeps a row per slot: max_cached_tokens under max_batch leaves no position per row; the
    settings say so (the bounded engine would refuse it at startup with a bare ValueError)."""
    from musicflamingo.serve import ServeConfigError

    with pytest.raises(ServeConfigError, match="max_cached_tokens=3 is under max_batch=4"):
        ServeSettings(max_batch=4, max_cached_tokens=3, compile=True)
    assert (
        ServeSettings(max_batch=4, max_cached_tokens=3).max_cached_tokens == 3
    )  # uncompiled: rows as needed
