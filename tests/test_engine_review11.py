"""Review round 11 of the engine's fitted KV cache (`Engine(max_positions=...)`, serve.py's `max_cached_tokens`):
compiled steps over a fitted cache, a chat turn refused by the bound."""

from __future__ import annotations

import pytest
import torch

import musicflamingo.engine as engine_module
from musicflamingo.engine import Engine, Request, SamplingParams, decode_step
from musicflamingo.model import MusicFlamingo, MusicFlamingoConfig


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MusicFlamingo(MusicFlamingoConfig.from_name("tiny")).eval()


def _prompt(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 290, (n,), generator=torch.Generator().manual_seed(seed))


def _run(engine: Engine, request: Request) -> list[int]:
    slot = engine.admit(request)
    while engine.decoding:
        engine.step()
    engine.release(slot.index)
    return slot.tokens


def test_compiled_fitted_engine_steps_through_few_capacities(model, monkeypatch):
    """A compiled step has static shapes: every cache capacity is a trace of its own (tens of seconds on a GPU,
    every stream stalled), and after torch._dynamo.config.recompile_limit (8) torch stops compiling. The fitted
    cache of a compiled server took the exact reach of each longer request past the last whole block: requests
    of 300..1000 tokens under max_cached_tokens=2000, max_batch=2 stepped at 5 capacities (512, 768, 800, 900,
    1000), one more per longer request. Now it doubles, then takes each row's share of the bound: 2. The tokens
    stay those of an unbounded eager engine, and the cache within the bound."""
    widths = set()

    def recording():  # stands in for torch.compile(decode_step): one trace per shape
        def step(model, ids, mask, rope, view):  # noqa: ANN001, ANN202
            widths.add((ids.shape[0], view.width, view.cache.capacity))
            return decode_step(model, ids, mask, rope, view)

        return step

    monkeypatch.setattr(engine_module, "_compiled_decode_step", recording)
    bound = 2000
    fitted, plain = Engine(model, slots=2, compile=True, max_positions=bound), Engine(model, slots=2)
    for i, reach in enumerate(range(300, 1001, 100)):
        request = Request(_prompt(reach - 3, i), SamplingParams(max_new_tokens=3))
        assert fitted.fits(request)
        assert _run(fitted, request) == _run(plain, request)
        assert fitted.cache.rows * fitted.cache.capacity <= bound
    assert all(rows == 2 and width == capacity for rows, width, capacity in widths), widths
    assert len(widths) <= 2, f"compiled steps at {len(widths)} capacities: {sorted(widths)}"
    # a request past a row's share of the bound (1000 positions) does not fit
    assert not fitted.fits(Request(_prompt(998, 0), SamplingParams(max_new_tokens=3)))


def test_a_chat_turn_refused_by_the_bound_leaves_the_slot_as_it_was(model):
    """`extend` into a fitted cache that the turn would pass raises, and "the conversation stays as it was": the
    slot kept the refused turn's reach, so the engine went on sizing for it and refused requests that fit
    beside the conversation (`fits` false, 2 x 730 positions over a bound of 600)."""
    engine = Engine(model, slots=2, max_positions=600)
    slot = engine.admit(Request(_prompt(20, 0), SamplingParams(max_new_tokens=4)), index=0)
    while engine.decoding:
        engine.step()
    with pytest.raises(RuntimeError, match="over its bound of 600"):
        engine.extend(0, _prompt(700, 1), SamplingParams(max_new_tokens=6))
    assert slot.done and slot.reach == 24 and slot.budget == 4
    other = Request(_prompt(200, 2), SamplingParams(max_new_tokens=50))
    assert engine.fits(other)
    engine.admit(other)
    assert engine.cache.rows * engine.cache.capacity <= 600
    turn = engine.extend(0, _prompt(10, 3), SamplingParams(max_new_tokens=4))  # the conversation goes on
    while engine.decoding:
        engine.step()
    assert turn.done and len(turn.tokens) == 4


def test_health_peak_cache_positions_counts_the_growth_in_decode_steps(model):
    """Without `max_cached_tokens` the cache grows in decode steps as a sequence reaches its end; /health's
    `peak_cache_positions` was noted at admissions only: after a 20-token prompt answered with 300 tokens it said
    2 x 256 positions while `cache_positions` said 2 x 512 (a peak under the current value)."""
    import asyncio

    from musicflamingo.serve.protocol import Prepared
    from musicflamingo.serve.worker import EngineWorker, Job

    worker = EngineWorker(model, slots=2)
    ids = _prompt(20, 0)
    prepared = Prepared(ids, None, None, SamplingParams(max_new_tokens=300), 20, 0, 0.0)

    async def run() -> list[int]:
        job = Job(prepared, asyncio.get_running_loop())
        worker.start()
        try:
            worker.submit(job)
            tokens = []
            while True:
                event = await asyncio.wait_for(job.queue.get(), 60)
                assert event.error is None, event.error
                tokens += event.tokens
                if event.finish:
                    return tokens
        finally:
            worker.stop()

    assert len(asyncio.run(run())) == 300
    stats = worker.stats()
    assert stats["cache_positions"] == 2 * 512
    assert stats["peak_cache_positions"] >= stats["cache_positions"], stats


def test_kv_cache_resize_frees_each_old_tensor_before_allocating_the_next(monkeypatch):
    """`resize` promised one old tensor beside the new cache, but `for layer, pair in enumerate(self.layers)`
    kept the layer's old (keys, values) tuple alive past the `del` (CPython's enumerate holds the item it yielded
    last): two old tensors at a time, the growth peak 72 MiB over a 64 MiB cache of 8 layers instead of 68.
    Counted exactly here: the old tensors alive at each allocation."""
    import weakref

    from musicflamingo.model.layers import KVCache

    layers = 3
    cache = KVCache(layers, 2, 8, 1, 4, torch.float32, "cpu")
    for k, v in cache.layers:
        k.fill_(1.0)
        v.fill_(2.0)
    del k, v  # the test holds no old tensor
    olds = [weakref.ref(t) for pair in cache.layers for t in pair]
    alive = []
    new_zeros = torch.Tensor.new_zeros

    def counting(self, *args, **kwargs):  # noqa: ANN001, ANN202
        alive.append(sum(r() is not None for r in olds))
        return new_zeros(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "new_zeros", counting)
    cache.resize(1, 16)
    monkeypatch.undo()
    assert alive == [2 * layers - k for k in range(2 * layers)], alive  # was [6, 6, 4, 4, 2, 2]
    assert all(r() is None for r in olds)
    assert all(k[:, :, :8].eq(1).all() and v[:, :, :8].eq(2).all() for k, v in cache.layers)
    assert all(k[:, :, 8:].eq(0).all() for k, _ in cache.layers) and cache.rows == 1
