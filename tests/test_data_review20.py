"""Review 20, training data at 10^6-10^7 clips: what every rank holds and computes for the batch sampler.

Ten million samples held each epoch's batches as lists of Python ints (2.2 GB per rank) and took 70 s per launch to
pack the longest epoch into rows (``data.pack``), a best fit over a sorted list of every batch. The batches and their
order must stay exactly those of the old code: a run resumed across this change checks its epoch's order digest.
"""

from __future__ import annotations

import bisect
import hashlib
import tracemalloc

import numpy as np
import pytest

from musicflamingo.data.sampler import Batches, MixtureDataset, TokenBudgetBatchSampler


def sorted_list_best_fit(lengths: np.ndarray, order: list[int], budget: int) -> list[list[int]]:
    """The packed tight packing as round 19 wrote it: every batch's (room, number) in one sorted list, each sample
    (longest first) into the first batch of least room that holds it."""
    batches: list[list[int]] = []
    room: list[tuple[int, int]] = []
    for i in order:
        n = int(lengths[i])
        k = bisect.bisect_left(room, (n, -1))
        if k < len(room):
            left, b = room.pop(k)
        else:
            left, b = budget, len(batches)
            batches.append([])
        batches[b].append(i)
        bisect.insort(room, (left - n, b))
    return batches


@pytest.mark.parametrize("trial", range(6))
def test_packed_tight_packing_is_the_sorted_list_best_fit(trial):
    rng = np.random.default_rng(trial)
    budget = int(rng.choice([64, 300, 1000]))
    # few distinct lengths (many ties between batches of equal room), lengths of the whole budget, and wide spreads
    high = [8, budget // 3, budget][trial % 3]
    lengths = rng.integers(1, high + 1, size=int(rng.integers(1, 3000)))
    s = TokenBudgetBatchSampler(lengths, budget, packed=True, seed=trial)
    indices = rng.choice(len(lengths), size=len(lengths) // 2 + 1, replace=bool(trial % 2))
    order = indices[np.argsort(-lengths[indices], kind="stable")].tolist()
    assert s._tight(indices) == sorted_list_best_fit(lengths, order, budget)


def global_order_digest(ranks: list[list[list[int]]]) -> str:
    """The order digest as round 19 computed it, from every rank's batches: the global list interleaves them
    (rank r holds batches r, r + R, ...), each batch hashed as its size, then its indices (int64)."""
    h = hashlib.blake2b(digest_size=8)
    for j in range(sum(map(len, ranks))):
        batch = ranks[j % len(ranks)][j // len(ranks)]
        h.update(np.asarray([len(batch), *batch], dtype=np.int64).tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize(
    "replicas,even_ranks,mixture", [(1, True, False), (3, True, True), (4, False, False)]
)
def test_order_digest_and_rank_batches_are_those_of_the_lists(packed, replicas, even_ranks, mixture):
    rng = np.random.default_rng(3)
    lengths = rng.integers(5, 300, size=2000)
    lengths[::83] = 400  # over the budget: carried along inside other batches
    kw: dict = {}
    if mixture:
        m = MixtureDataset([range(1500), range(500)], [0.6, 2.4], lengths=[lengths[:1500], lengths[1500:]])
        kw = {"epoch_indices": m.epoch_indices, "longest_epoch": m.longest_epoch}
    for seed in (0, 11):
        samplers = [
            TokenBudgetBatchSampler(
                lengths,
                350,
                seed=seed,
                num_replicas=replicas,
                rank=r,
                packed=packed,
                on_oversized="carry",
                even_ranks=even_ranks,
                bucket_size_multiplier=2,
                **kw,
            )
            for r in range(replicas)
        ]
        for epoch in range(3):
            ranks = []
            for s in samplers:
                s.set_epoch(epoch)
                ranks.append(list(s))
                assert len(ranks[-1]) == len(s)
                assert all(type(b) is list and all(type(i) is int for i in b) for b in ranks[-1])
            assert all(s.order_digest(epoch) == global_order_digest(ranks) for s in samplers)
            # a resume inside the epoch hands out the rest of the rank's batches
            state = samplers[-1].state_dict(batches_consumed=2)
            again = TokenBudgetBatchSampler(
                lengths,
                350,
                seed=seed,
                num_replicas=replicas,
                rank=replicas - 1,
                packed=packed,
                on_oversized="carry",
                even_ranks=even_ranks,
                bucket_size_multiplier=2,
                **kw,
            )
            again.load_state_dict(state)
            assert list(again) == ranks[-1][2:]


def test_last_resort_slots_are_those_of_the_lists():
    """An epoch that made too many batches takes the longest epoch's tight packing, its samples in the slots of
    samples at least as long (`_into_bound_slots`): the same batches as round 19's lists."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, size=500)
    m = MixtureDataset([range(500)], [0.5], lengths=[lengths])
    s = TokenBudgetBatchSampler(
        lengths, 200, packed=True, epoch_indices=m.epoch_indices, longest_epoch=m.longest_epoch
    )
    for epoch in range(4):
        indices = m.epoch_indices(epoch)
        slots = [(int(lengths[i]), b) for b, batch in enumerate(s._bound_batches) for i in batch]
        slots.sort(key=lambda x: -x[0])
        out: list[list[int]] = [[] for _ in slots]
        for i, (_, b) in zip(indices[np.argsort(-lengths[indices], kind="stable")].tolist(), slots):
            out[b].append(i)
        assert s._into_bound_slots(indices) == [b for b in out if b]


def test_batches_index_and_slice_as_the_lists_do():
    rng = np.random.default_rng(1)
    lists = [rng.integers(0, 10**9, size=int(rng.integers(0, 5))).tolist() for _ in range(40)]
    held = Batches.of(lists)
    assert list(held) == lists and len(held) == len(lists)
    assert [held[j] for j in range(-len(lists), len(lists))] == [
        lists[j] for j in range(-len(lists), len(lists))
    ]
    for cut in (slice(3, None, 4), slice(None, None, -3), slice(5, 2), slice(-7, None), slice(1, 30, 7)):
        assert list(held[cut]) == lists[cut]
        assert list(held[cut][1:]) == lists[cut][1:]
    with pytest.raises(IndexError):
        held[len(lists)]
    assert list(Batches.of([])) == [] and list(Batches.of([[]])) == [[]]


def test_an_epochs_batches_held_take_bytes_not_objects_per_sample():
    """Every rank holds its epoch's global batch list (and the longest epoch's packing) for the run: 16 bytes a
    sample as arrays; a list of lists of Python ints took ~120 (10 M samples: 2.2 GB per rank at its peak)."""
    n = 200_000
    lengths = np.random.default_rng(0).integers(200, 1500, size=n)
    tracemalloc.start()
    try:
        s = TokenBudgetBatchSampler(lengths, 4096, seed=1, num_replicas=8, rank=3)
        for epoch in range(2):
            s.set_epoch(epoch)
            for _ in s:
                pass
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the lengths (8 bytes a sample), the longest epoch's packing and this epoch's batches (16 each, and 8 a batch)
    assert held / n < 60, held / n
