"""Review 19, training data at scale: the batch sampler's setup work per launch and epoch.

At 10^6-10^7 records the sampler's per-sample Python loops set the launch time of every rank (a million samples:
setup 8.6 s -> 5.3 s CPU, the first batch 2.3 s -> 0.2 s, measured with a 1 M-record manifest and its index). The
batches must stay exactly those of the per-sample greedy loops: a run resumed across this change checks its epoch's
batch order by digest.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from musicflamingo.data.sampler import MixtureDataset, TokenBudgetBatchSampler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_fixtures import write_dataset, write_processor  # noqa: E402


def greedy_fill(lengths: np.ndarray, chunk: list[int], budget: int, packed: bool) -> list[list[int]]:
    """The per-sample greedy fill of one length-sorted bucket, as the sampler defines it: a sample joins the batch
    unless the batch's cost with it (packed: the sum; padded: count times the longest) passes the budget."""
    batches, batch, longest, total = [], [], 0, 0
    for i in chunk:
        n = int(lengths[i])
        cost = total + n if packed else (len(batch) + 1) * max(longest, n)
        if batch and cost > budget:
            batches.append(batch)
            batch, longest, total = [], 0, 0
        batch.append(i)
        longest, total = max(longest, n), total + n
    return batches + ([batch] if batch else [])


def reference_bucketed(
    s: TokenBudgetBatchSampler, indices: np.ndarray, rng: np.random.Generator
) -> list[list[int]]:
    if s.shuffle:
        indices = indices[rng.permutation(len(indices))]
    bucket = max(1, int(s.bucket_size_multiplier * max(1.0, s.max_tokens / float(s.lengths[indices].mean()))))
    out = []
    for start in range(0, len(indices), bucket):
        chunk = indices[start : start + bucket]
        chunk = chunk[np.argsort(s.lengths[chunk], kind="stable")]
        out += greedy_fill(s.lengths, chunk.tolist(), s.max_tokens, s.packed)
    return out


def reference_tight_padded(s: TokenBudgetBatchSampler, indices: np.ndarray) -> list[list[int]]:
    """Longest first; a sample joins the last batch while the batch's count times its first (longest) fits."""
    batches: list[list[int]] = []
    for i in indices[np.argsort(-s.lengths[indices], kind="stable")].tolist():
        if batches and (len(batches[-1]) + 1) * int(s.lengths[batches[-1][0]]) <= s.max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@pytest.mark.parametrize("packed", [False, True])
def test_batches_are_those_of_the_per_sample_greedy_fill(packed):
    rng = np.random.default_rng(7)
    for trial in range(120):
        n = int(rng.integers(1, 300))
        # short, equal, and oversized samples (longer than the budget: a batch of their own)
        lengths = rng.integers(1, int(rng.choice([4, 60, 900, 5000])), size=n)
        budget = int(rng.integers(1, 3000))
        s = TokenBudgetBatchSampler(
            lengths,
            budget,
            shuffle=bool(trial % 3),
            packed=packed,
            on_oversized="carry",
            bucket_size_multiplier=int(rng.integers(1, 4)),
        )
        indices = np.arange(n)
        got = s._bucketed(indices, np.random.default_rng(trial))
        assert got == reference_bucketed(s, indices, np.random.default_rng(trial)), trial
        want = [
            int(lengths[b].sum()) if packed else len(b) * int(lengths[b].max()) for b in got
        ]  # each batch's cost, as _to_count ranks them
        assert s._costs(got).tolist() == want
        if not packed:
            assert s._tight(indices) == reference_tight_padded(s, indices), trial


@pytest.mark.parametrize("packed", [False, True])
def test_epoch_zero_is_bucketed_once_per_launch(monkeypatch, packed):
    """The sampler buckets epoch 0 to fix its batch count; the first epoch's batches go on from that work instead of
    shuffling and bucketing every sample again (a second per million samples at every launch), and are the same
    batches as a sampler that never built epoch 0 before."""
    lengths = np.random.default_rng(0).integers(20, 400, size=500)
    mixture = MixtureDataset([list(range(300)), list(range(200))], [1.0, 0.5], seed=3)
    kwargs = dict(
        seed=3,
        packed=packed,
        num_replicas=2,
        epoch_indices=mixture.epoch_indices,
        longest_epoch=mixture.longest_epoch,
    )
    calls = []
    bucketed = TokenBudgetBatchSampler._bucketed
    monkeypatch.setattr(
        TokenBudgetBatchSampler, "_bucketed", lambda self, *a: calls.append(1) or bucketed(self, *a)
    )
    s = TokenBudgetBatchSampler(lengths, 1200, **kwargs)
    first = list(s)
    assert len(calls) == 1
    s.set_epoch(1)
    list(s)
    assert len(calls) == 2  # a later epoch is bucketed anew

    # the batches of a sampler whose epoch-0 bucketing was spent on another epoch first
    fresh = TokenBudgetBatchSampler(lengths, 1200, **kwargs)
    fresh.set_epoch(1)
    list(fresh)
    fresh.set_epoch(0)
    assert list(fresh) == first
    assert fresh.order_digest(0) == s.order_digest(0)


def test_datamodule_hands_the_sampler_the_mixture_lengths_array(tmp_path):
    """The token lengths stay one int64 array from the index to the sampler: no list of Python ints per sample
    (10 M of them: ~0.4 GB and seconds per rank) and no second copy in the sampler."""
    from musicflamingo.data.datamodule import MusicFlamingoDataModule
    from musicflamingo.processor import MusicFlamingoProcessor

    proc = MusicFlamingoProcessor.from_pretrained(write_processor(tmp_path / "proc"))
    manifest = write_dataset(tmp_path / "data", n=6)
    dm = MusicFlamingoDataModule(
        train=str(manifest), val=str(manifest), processor=proc, batch_max_tokens=4096
    )
    dm.setup("fit")
    assert np.shares_memory(dm.train_sampler.lengths, dm.train_dataset.lengths)
    assert np.shares_memory(dm.val_sampler.lengths, dm.val_dataset.lengths)
