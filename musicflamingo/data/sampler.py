"""Token-budget batching and weighted dataset mixtures.

:class:`TokenBudgetBatchSampler` groups samples of similar length so that every batch's padded cost
``len(batch) * max(lengths in batch)`` stays within ``max_tokens`` (lengths are total tokens per sample: text
plus audio placeholders, see :func:`musicflamingo.data.dataset.estimate_num_tokens`). It is deterministic for
``(seed, epoch)``, splits whole batches across ranks, and can resume in the middle of an epoch.

:class:`MixtureDataset` concatenates datasets and draws each epoch's sample list with per-dataset weights.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import itertools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset

log = logging.getLogger(__name__)


def _generator(*keys: int) -> np.random.Generator:
    """A numpy generator seeded from integer keys (seed, epoch, ...); same keys -> same stream on every rank."""
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in keys])


def _cut(items: list[int], ends: list[int]) -> list[list[int]]:
    """``items`` cut before each of the increasing positions ``ends`` (the last one ``len(items)``)."""
    return [items[a:b] for a, b in zip([0, *ends[:-1]], ends)]


class Batches(Sequence):
    """Batches of sample indices held as two int64 arrays, ``flat`` [M] (every batch's indices, one batch after
    another) and ``offsets`` [B + 1] (batch ``j`` is ``flat[offsets[j]:offsets[j + 1]]``): 16 bytes a sample and 8
    a batch, where a list of lists of Python ints took ~120 (ten million samples: 2.2 GB per rank, held for the
    run). ``batches[j]`` and iteration give lists of ints, a slice gives :class:`Batches`."""

    def __init__(self, flat: np.ndarray, offsets: np.ndarray) -> None:
        self.flat, self.offsets = flat, offsets

    @classmethod
    def of(cls, batches: Sequence[Sequence[int]]) -> Batches:
        """``batches`` (a list of lists of indices) held as arrays."""
        sizes = np.fromiter(map(len, batches), dtype=np.int64, count=len(batches))
        offsets = np.zeros(len(batches) + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        flat = np.fromiter(itertools.chain.from_iterable(batches), dtype=np.int64, count=int(offsets[-1]))
        return cls(flat, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, j: int | slice) -> Any:
        if isinstance(j, slice):
            return self.take(np.arange(len(self))[j])
        j = range(len(self))[j]  # an IndexError past the end, as a list's
        return self.flat[self.offsets[j] : self.offsets[j + 1]].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        flat, bounds = self.flat, self.offsets.tolist()
        return (flat[a:b].tolist() for a, b in zip(bounds, bounds[1:]))

    def sizes(self) -> np.ndarray:
        """Each batch's sample count [B]."""
        return np.diff(self.offsets)

    def take(self, which: np.ndarray) -> Batches:
        """The batches at positions ``which`` [K], in that order."""
        sizes = self.sizes()[which]
        offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        # each sample's place in flat: its batch's start there, plus its place in the batch
        at = np.repeat(self.offsets[which] - offsets[:-1], sizes) + np.arange(offsets[-1])
        return Batches(self.flat[at], offsets)


class TokenBudgetBatchSampler:
    """Length-grouped batches under a padded-token budget, split across data-parallel ranks.

    One epoch: shuffle the sample indices with ``(seed, epoch)``; cut them into buckets of about
    ``bucket_size_multiplier`` batches; sort each bucket by length and fill batches greedily while
    ``(n + 1) * max_len <= max_tokens`` (``packed``: the sum of lengths); bring the count to the run's fixed
    :attr:`num_batches` (below); shuffle the batch order. Every rank builds the same global batch list and takes
    ``batches[rank::num_replicas]``, so ranks get disjoint samples and the same number of batches (the list is
    padded by repeating its first batches, or truncated with ``drop_last``), as training needs: DDP reduces the
    gradients at every step, and a rank with one batch less leaves the others waiting. ``even_ranks=False``
    (validation) pads nothing: every sample once, the ranks' batch counts differing by one at most.

    The batch count is fixed for the run: Lightning reads ``len(dataloader)`` once and ends every epoch after that
    many batches, so an epoch whose reshuffled buckets made more batches would lose its last ones. ``num_batches``
    is the larger of epoch 0's count and the count of a tight packing of :meth:`longest epoch <_bound_indices>`;
    an epoch that made fewer batches splits its fullest ones, one that made more repacks its least full ones
    (down to all of them), and as a last resort takes the tight packing's batches, each sample in the slot of a
    sample at least as long. Every batch stays within the budget and every sample of the epoch is in one; an epoch
    has fewer batches only when it has fewer samples than ``num_batches``.

    Lightning: pass as ``DataLoader(batch_sampler=...)`` with ``Trainer(use_distributed_sampler=False)`` (this
    sampler does the distributed split). Lightning calls ``set_epoch`` through ``batch_sampler.sampler``.

    Args:
        lengths: total tokens of each sample (text + audio tokens).
        max_tokens: budget for ``batch size * longest sample`` (padded tokens per batch and rank).
        shuffle: shuffle samples and batches per epoch; ``False`` gives length-sorted, fixed batches.
        seed: base seed; the order depends only on ``(seed, epoch)``.
        num_replicas, rank: data-parallel world size and this process's rank.
        drop_last: drop the trailing batches that do not divide evenly across ranks instead of repeating some.
        bucket_size_multiplier: bucket size in batches; larger buckets give tighter length grouping, less
            randomness.
        epoch_indices: ``epoch -> indices`` making up the epoch (e.g. :meth:`MixtureDataset.epoch_indices`);
            default: every index once.
        longest_epoch: with ``epoch_indices``: ``(lengths, max_tokens) -> indices`` of a multiset of samples no
            longer than ``max_tokens`` that dominates every epoch's (:meth:`MixtureDataset.longest_epoch`), from
            which the fixed batch count is taken.
        packed: the batch's cost is the sum of its lengths instead: one row of
            :func:`~musicflamingo.data.collate.collate_packed` holding up to ``max_tokens`` tokens.
        on_oversized: samples longer than ``max_tokens`` (listed in :attr:`oversized`) raise (``"error"``), are left
            out with a warning (``"skip"``), or are carried along (``"carry"``): each epoch hands them out inside
            the batches of samples that fit, at no token cost, for the dataset to return a bad-sample marker in
            their place (see :attr:`MixtureDataset.markers`), so that they are counted like any bad sample.
        even_ranks: every rank gets the same number of batches, some repeated (padding, see above). ``False``: no
            batch repeated (an average over all ranks' batches, such as a validation loss, counts every sample once);
            batches are split until every rank has one, and fewer samples than ranks are refused (a rank without a
            batch would leave the others waiting at the metric's reduction).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        max_tokens: int,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
        bucket_size_multiplier: int = 100,
        epoch_indices: Callable[[int], Sequence[int]] | None = None,
        longest_epoch: Callable[[np.ndarray, int], Sequence[int]] | None = None,
        on_oversized: str = "error",
        packed: bool = False,
        even_ranks: bool = True,
    ) -> None:
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if self.lengths.ndim != 1 or len(self.lengths) == 0:
            raise ValueError(f"lengths must be a non-empty 1-D sequence, got shape {self.lengths.shape}")
        if (self.lengths <= 0).any():
            raise ValueError(
                f"lengths must be > 0; index {int(np.argmin(self.lengths))} has {self.lengths.min()}"
            )
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be > 0, got {max_tokens}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(
                f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas=} {rank=}"
            )
        if bucket_size_multiplier < 1:
            raise ValueError(f"bucket_size_multiplier must be >= 1, got {bucket_size_multiplier}")
        if epoch_indices is not None and longest_epoch is None:
            raise ValueError(
                "epoch_indices needs longest_epoch too (e.g. MixtureDataset.longest_epoch): the batch count per "
                "epoch is fixed for the run from the longest epoch the indices can make"
            )
        if on_oversized not in ("error", "skip", "carry"):
            raise ValueError(f"on_oversized must be 'error', 'skip' or 'carry', got {on_oversized!r}")
        self.oversized = np.flatnonzero(self.lengths > max_tokens).tolist()
        if self.oversized and on_oversized == "error":
            i = self.oversized[0]
            raise ValueError(
                f"{len(self.oversized)} sample(s) are longer than max_tokens={max_tokens} (e.g. index {i} with "
                f"{self.lengths[i]} tokens); raise the batch token budget or pass on_oversized='skip'"
            )
        if self.oversized and on_oversized == "skip":
            log.warning("leaving out %d sample(s) longer than max_tokens=%d", len(self.oversized), max_tokens)
        self.on_oversized = on_oversized
        self.max_tokens = int(max_tokens)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.drop_last = drop_last
        self.bucket_size_multiplier = int(bucket_size_multiplier)
        self.epoch_indices = epoch_indices
        self.longest_epoch = longest_epoch
        self.packed = bool(packed)
        self.even_ranks = bool(even_ranks)
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, batches already consumed on this rank)
        self._yielded = 0
        self._cache: tuple[int, Batches] | None = None
        self._digest: tuple[int, str] | None = None  # (epoch, order_digest)
        # the tight packing of the longest epoch: the last resort of an epoch that made too many batches
        self._bound_batches = Batches.of(self._tight(self._bound_indices()))
        indices, _ = self._epoch_samples(0)
        rng = _generator(self.seed, 0)
        first = self._bucketed(indices, rng)
        # epoch 0's bucketing and its generator's state after it, for _global_batches(0) to go on from
        self._epoch0: tuple[list[list[int]], np.random.Generator] | None = (first, rng)
        #: global batches per epoch (before the split across ranks), the same for every epoch of the run
        self.num_batches = max(len(first), len(self._bound_batches))
        if not self.even_ranks and self.num_replicas > 1:
            n = len(indices) + len(self._epoch_samples(0)[1])
            if n < self.num_replicas:
                raise ValueError(
                    f"{n} sample(s) for {self.num_replicas} ranks: every rank needs one of its own (even_ranks=False "
                    "repeats none); add samples or run on fewer devices"
                )
            # every rank a batch of its own: the fullest batches are split (a fixed count, as above)
            self.num_batches = max(self.num_batches, self.num_replicas)

    @property
    def sampler(self) -> TokenBudgetBatchSampler:
        # Lightning's `_set_sampler_epoch` reaches `set_epoch` through `dataloader.batch_sampler.sampler`.
        return self

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next ``__iter__`` yields."""
        self.epoch = int(epoch)

    def _epoch_samples(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices that fit the budget, oversized indices carried along) making up ``epoch``, unshuffled."""
        indices = (
            np.arange(len(self.lengths))
            if self.epoch_indices is None
            else np.asarray(self.epoch_indices(epoch), dtype=np.int64)
        )
        carried = np.zeros(0, dtype=np.int64)
        if self.oversized:
            fits = self.lengths[indices] <= self.max_tokens
            if self.on_oversized == "carry":
                carried = indices[~fits]
            indices = indices[fits]
        return indices, carried

    def _bound_indices(self) -> np.ndarray:
        """A multiset of fitting samples that dominates every epoch's: at least as many samples, and rank by rank
        (sorted by length) none shorter. With the default epoch (every index once) it is that epoch."""
        if self.longest_epoch is None:
            return np.flatnonzero(self.lengths <= self.max_tokens)
        return np.asarray(self.longest_epoch(self.lengths, self.max_tokens), dtype=np.int64)

    def _costs(self, batches: list[list[int]]) -> np.ndarray:
        """Each of the (non-empty) ``batches``' cost [B]: its size times its longest sample (padded) or the sum of
        its lengths (packed)."""
        sizes = np.fromiter(map(len, batches), dtype=np.int64, count=len(batches))
        flat = np.fromiter(itertools.chain.from_iterable(batches), dtype=np.int64, count=int(sizes.sum()))
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        lengths = self.lengths[flat]
        if self.packed:
            return np.add.reduceat(lengths, starts)
        return sizes * np.maximum.reduceat(lengths, starts)

    def _bucketed(self, indices: np.ndarray, rng: np.random.Generator) -> list[list[int]]:
        """Shuffle, cut into buckets, sort each bucket by length and fill batches greedily (the epoch's own count)."""
        if self.shuffle:
            indices = indices[rng.permutation(len(indices))]
        mean_len = float(self.lengths[indices].mean()) if len(indices) else 1.0
        bucket = max(1, int(self.bucket_size_multiplier * max(1.0, self.max_tokens / mean_len)))
        batches: list[list[int]] = []
        for start in range(0, len(indices), bucket):
            chunk = indices[start : start + bucket]
            # Stable sort keeps the shuffled order among equal lengths (and index order without shuffle).
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batches.extend(_cut(chunk.tolist(), self._greedy_ends(self.lengths[chunk])))
        return batches

    def _greedy_ends(self, lengths: np.ndarray) -> list[int]:
        """Where the batches end when samples of ``lengths`` [K] (ascending) are added in order, each batch closed
        before the sample that would take it over the budget (a batch holds one sample at least).

        One ``searchsorted`` finds every jump, so Python loops over batches, not samples (every rank buckets every
        sample at launch and at each epoch). A batch from ``s`` closes before the first ``p > s`` whose cost exceeds the budget:
        packed, ``C[p + 1] - C[s] > max_tokens`` (``C`` the cumulative lengths); padded, ``(p - s + 1) * L[p] >
        max_tokens`` (ascending: ``L[p]`` is the longest), i.e. ``g(p) = p - max_tokens // L[p] >= s``, and ``g``
        increases with ``p``."""
        k = len(lengths)
        if self.packed:
            cum = np.cumsum(lengths)
            start = np.concatenate([[0], cum[:-1]])
            first_over = np.searchsorted(cum, start + self.max_tokens, side="right")
        else:
            g = np.arange(k) - self.max_tokens // lengths
            first_over = np.searchsorted(g, np.arange(k), side="left")
        jump = np.maximum(first_over, np.arange(1, k + 1)).tolist()
        ends, s = [], 0
        while s < k:
            s = jump[s]
            ends.append(s)
        return ends

    def _tight(self, indices: np.ndarray) -> list[list[int]]:
        """Few batches for ``indices``, longest samples first. Padded: each batch starts at the longest sample left
        and takes the next ones while they fit (the fewest batches there are). Packed: best fit decreasing."""
        order = indices[np.argsort(-self.lengths[indices], kind="stable")]
        if not self.packed:
            # a batch from sample s holds max_tokens // L[s] samples: its first is its longest
            size = np.maximum(1, self.max_tokens // self.lengths[order]).tolist()
            ends, s = [], 0
            while s < len(order):
                s = min(s + size[s], len(order))
                ends.append(s)
            return _cut(order.tolist(), ends)
        # Best fit: each sample joins the batch with the least room that holds it (the first such batch on ties),
        # else a new one. The batches are kept by their room, a heap of batch numbers per room in tokens, and the
        # rooms some batch has in a sorted list: a search among the (at most max_tokens) rooms, not the batches
        # (a sorted list of every batch took O(batches) per sample: 10 M samples, 70 s).
        batches: list[list[int]] = []
        rooms: list[int] = []  # sorted, each with a non-empty heap
        with_room: dict[int, list[int]] = {}
        lengths = self.lengths[order].tolist()
        shortest = min(lengths, default=0)
        for i, n in zip(order.tolist(), lengths):
            k = bisect.bisect_left(rooms, n)
            if k < len(rooms):
                left = rooms[k]
                heap = with_room[left]
                b = heapq.heappop(heap)
                if not heap:
                    del rooms[k], with_room[left]
            else:
                left, b = self.max_tokens, len(batches)
                batches.append([])
            batches[b].append(i)
            left -= n
            if left >= shortest:  # (room for no sample left: never chosen again)
                if left in with_room:
                    heapq.heappush(with_room[left], b)
                else:
                    with_room[left] = [b]
                    bisect.insort(rooms, left)
        return batches

    def _to_count(self, batches: list[list[int]], indices: np.ndarray) -> list[list[int]]:
        """``batches`` (of ``indices``) brought to :attr:`num_batches`, every batch within the budget."""
        target = self.num_batches
        if len(batches) > target:
            # repack the least full batches, twice as many each try, until the count fits
            fill = np.argsort(self._costs(batches), kind="stable").tolist()
            m = 1
            while True:
                m = min(2 * m, len(batches))
                pool = set(fill[:m])
                kept = [b for j, b in enumerate(batches) if j not in pool]
                moved = np.asarray([i for j in sorted(pool) for i in batches[j]], dtype=np.int64)
                repacked = kept + self._tight(moved)
                if len(repacked) <= target:
                    batches = repacked
                    break
                if m == len(batches):  # all of them repacked still make too many (packed: a heuristic's miss)
                    batches = self._into_bound_slots(indices)
                    break
        # split the batch with the most samples in two (sorted by length: halves of similar lengths)
        heap = [(-len(b), j) for j, b in enumerate(batches)]
        heapq.heapify(heap)
        while len(batches) < target and heap and -heap[0][0] > 1:
            _, j = heapq.heappop(heap)
            b = sorted(batches[j], key=lambda i: (int(self.lengths[i]), i))
            batches[j], tail = b[: len(b) // 2], b[len(b) // 2 :]
            batches.append(tail)
            heapq.heappush(heap, (-len(batches[j]), j))
            heapq.heappush(heap, (-len(tail), len(batches) - 1))
        return batches

    def _into_bound_slots(self, indices: np.ndarray) -> list[list[int]]:
        """The tight packing of the longest epoch with this epoch's samples in its places: the i-th longest sample
        takes the place of the i-th longest of that epoch, which is at least as long, so every batch fits."""
        bound = self._bound_batches
        # the slots (each sample of the bound's batches, batch by batch) longest first, ties in that order
        by_length = np.argsort(-self.lengths[bound.flat], kind="stable")
        room = self.lengths[bound.flat][by_length]
        slot_batch = np.repeat(np.arange(len(bound)), bound.sizes())[by_length].tolist()
        order = indices[np.argsort(-self.lengths[indices], kind="stable")]
        if len(order) > len(room) or (self.lengths[order] > room[: len(order)]).any():
            raise RuntimeError(
                "longest_epoch does not dominate this epoch's samples; the fixed batch count cannot hold them"
            )
        out: list[list[int]] = [[] for _ in range(len(bound))]
        for i, b in zip(order.tolist(), slot_batch):
            out[b].append(i)
        return [b for b in out if b]

    def _global_batches(self, epoch: int) -> Batches:
        """All ranks' batches of ``epoch`` (padded/truncated to a multiple of ``num_replicas``), held as arrays
        until the epoch's next one is built."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        indices, carried = self._epoch_samples(epoch)
        if epoch == 0 and self._epoch0 is not None:
            bucketed, rng = self._epoch0
        else:
            rng = _generator(self.seed, epoch)
            bucketed = self._bucketed(indices, rng)
        self._epoch0 = None  # used once (_to_count changes its lists), or never once another epoch is built
        batches = self._to_count(bucketed, indices)
        if self.shuffle:
            batches = [batches[j] for j in rng.permutation(len(batches))]
        if len(carried):
            # Replaced by markers, never built: they cost no tokens. Spread over the batches (a batch of their own
            # when nothing fits) so that every rank counts its share.
            if not batches:
                batches = [[] for _ in range(self.num_replicas)]
            where = (
                _generator(self.seed, epoch, 1).integers(len(batches), size=len(carried))
                if self.shuffle
                else np.arange(len(carried)) % len(batches)
            )
            for b, i in zip(where.tolist(), carried.tolist()):
                batches[b].append(i)
            batches = [b for b in batches if b]
        self._cache = None  # the previous epoch's, freed before this one is held
        self._cache = (epoch, Batches.of(self._per_rank(batches)))
        return self._cache[1]

    def _per_rank(self, batches: list[list[int]]) -> list[list[int]]:
        if not self.even_ranks:
            return batches
        remainder = len(batches) % self.num_replicas
        if remainder and self.drop_last:
            return batches[: len(batches) - remainder]
        if remainder:
            need = self.num_replicas - remainder
            return batches + [batches[j % len(batches)] for j in range(need)]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        epoch = self.epoch
        mine = self._global_batches(epoch)[self.rank :: self.num_replicas]
        skip = 0
        if self._resume is not None and self._resume[0] == epoch:
            skip = self._resume[1]
        self._resume = None
        self._yielded = skip
        for batch in mine[skip:]:
            self._yielded += 1
            yield batch

    def order_digest(self, epoch: int) -> str:
        """A digest of ``epoch``'s global batch list: equal only when the epoch hands out the same samples in the
        same batches and order (same data, weights, lengths, budget and settings)."""
        if self._digest is None or self._digest[0] != epoch:
            batches = self._global_batches(epoch)
            # each batch as its size, then its indices (int64): the bytes one update per batch hashed, in one
            sizes = batches.sizes()
            starts = batches.offsets[:-1] + np.arange(len(batches))  # where each size goes
            row = np.ones(len(batches.flat) + len(batches), dtype=bool)
            row[starts] = False
            data = np.empty(len(row), dtype=np.int64)
            data[starts], data[row] = sizes, batches.flat
            self._digest = (epoch, hashlib.blake2b(data.tobytes(), digest_size=8).hexdigest())
        return self._digest[1]

    def __len__(self) -> int:
        """Batches per rank and epoch, the same for every epoch of the run (the full epoch, also when resuming
        inside it)."""
        n = self.num_batches
        if n == 0 and self.on_oversized == "carry" and self.oversized:
            n = self.num_replicas  # nothing fits: the carried samples make batches of their own
        if not self.even_ranks:  # this rank's share, its batches counted
            return len(range(self.rank, len(self._global_batches(self.epoch)), self.num_replicas))
        if self.drop_last:
            return n // self.num_replicas
        return -(-n // self.num_replicas)

    def state_dict(self, batches_consumed: int | None = None, epoch: int | None = None) -> dict[str, Any]:
        """Position inside the epoch. ``batches_consumed`` defaults to the batches ``__iter__`` handed out,
        which runs ahead of training when a DataLoader prefetches: the training loop should pass its own count;
        ``epoch`` defaults to the sampler's. Inside an epoch, ``order`` (:meth:`order_digest`) lets a resume check
        that the epoch still hands out the batches trained on: a manifest reordered or edited between runs, or
        other weights, keep the record count but not the order."""
        epoch = self.epoch if epoch is None else int(epoch)
        consumed = self._yielded if batches_consumed is None else int(batches_consumed)
        state = {
            "epoch": epoch,
            "batches_consumed": consumed,
            "seed": self.seed,
            "num_replicas": self.num_replicas,
            "num_samples": len(self.lengths),
            "max_tokens": self.max_tokens,
            "num_batches": self.num_batches,
            "packed": self.packed,
        }
        if 0 < consumed < len(self):
            state["order"] = self.order_digest(epoch)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue epoch ``state["epoch"]`` with the batch after the ``batches_consumed`` already trained on (the
        start of the next epoch when all of its batches were)."""
        if "packed" in state and bool(state["packed"]) != self.packed:
            # checked first: the batch count it changes would be named instead
            was, now_is = ("packed", "padded") if state["packed"] else ("padded", "packed")
            raise ValueError(
                f"cannot resume the batch sampler exactly: its batches were {was} rows when saved, now {now_is} "
                f"(data.pack={str(not self.packed).lower()} wrote the checkpoint); resume with that setting"
            )
        now = {"seed": self.seed, "num_replicas": self.num_replicas, "num_samples": len(self.lengths)}
        now["max_tokens"], now["num_batches"] = self.max_tokens, self.num_batches
        for key, value in now.items():
            if key in state and state[key] != value:
                raise ValueError(
                    f"cannot resume the batch sampler exactly: {key} was {state[key]} when saved, now {value}"
                )
        epoch, consumed = int(state["epoch"]), int(state["batches_consumed"])
        if "order" in state and 0 < consumed < len(self) and state["order"] != self.order_digest(epoch):
            raise ValueError(
                f"cannot resume the batch sampler exactly: epoch {epoch}'s batches differ from those the checkpoint "
                f"was written with ({consumed} of them trained on), so the rest of the epoch would repeat some "
                "samples and never reach others: the training data changed (a manifest edited or reordered, other "
                "weights or token lengths) though its record count did not; resume with the data that wrote it, or "
                "start a new run from the weights"
            )
        if 0 < len(self) <= consumed:
            # Epoch `epoch` is over: the next is Lightning's next. A DataLoader with workers runs `__iter__` before
            # Lightning's `set_epoch`, which would otherwise hand out an empty rest of `epoch` as the next epoch.
            epoch, consumed = epoch + 1, 0
        self.epoch = epoch
        self._resume = (epoch, consumed)


class MixtureDataset(Dataset):
    """Concatenation of datasets whose epochs are weighted draws.

    ``weights[k]`` is how often each sample of dataset ``k`` is visited per epoch on average: ``1`` = once,
    ``2.0`` = twice (upsampling a small set), ``0.25`` = a fresh random quarter each epoch. Dataset ``k`` then
    contributes ``round(weights[k] * len(datasets[k]))`` indices to epoch ``e``, drawn deterministically from
    ``(seed, e, k)``: whole passes over it plus a random subset without replacement. A weight above 0 that draws
    no sample (``0.3`` for a single record) is refused, naming the dataset (``names[k]``). Use :meth:`epoch_indices`
    as the sampler's ``epoch_indices`` and :attr:`lengths` as its lengths.
    """

    def __init__(
        self,
        datasets: Sequence[Dataset],
        weights: Sequence[float] | None = None,
        lengths: Sequence[Sequence[int]] | None = None,
        seed: int = 0,
        names: Sequence[str] | None = None,
    ) -> None:
        if not datasets:
            raise ValueError("MixtureDataset needs at least one dataset")
        weights = [1.0] * len(datasets) if weights is None else [float(w) for w in weights]
        if len(weights) != len(datasets):
            raise ValueError(f"got {len(weights)} weights for {len(datasets)} datasets")
        if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"weights must be finite, >= 0 and not all 0, got {weights}")
        self.datasets = list(datasets)
        self.weights = weights
        self.seed = int(seed)
        self.sizes = [len(d) for d in self.datasets]
        for k, (size, w) in enumerate(zip(self.sizes, weights)):
            if (
                w > 0 and size and round(w * size) == 0
            ):  # a dataset meant to be sampled that no epoch would draw
                name = names[k] if names is not None else f"dataset {k}"
                raise ValueError(
                    f"{name}: weight {w:g} x {size} samples draws round({w * size:g}) = 0 samples per epoch, so it "
                    f"would never be trained on; give it a weight above {0.5 / size:.3g} (or 0 to leave it out)"
                )
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        if lengths is not None:
            if [len(x) for x in lengths] != self.sizes:
                raise ValueError(
                    f"lengths sizes {[len(x) for x in lengths]} do not match datasets {self.sizes}"
                )
            self.lengths = np.concatenate([np.asarray(x, dtype=np.int64) for x in lengths])
        # global index -> what to return instead of building the sample (the data module's bad-sample markers for
        # samples over the batch token budget)
        self.markers: dict[int, Any] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """``(dataset k, index within it)`` of a global index."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a mixture of {len(self)} samples")
        k = int(np.searchsorted(self.offsets, index, side="right") - 1)
        return k, index - int(self.offsets[k])

    def __getitem__(self, index: int) -> Any:
        if index in self.markers:
            return self.markers[index]
        k, local = self.locate(index)
        return self.datasets[k][local]

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """Global indices making up ``epoch`` (unordered; the batch sampler shuffles them)."""
        parts = []
        for k, (size, w) in enumerate(zip(self.sizes, self.weights)):
            n = int(round(w * size))
            if n == 0 or size == 0:
                continue
            full, rest = divmod(n, size)
            local = [np.arange(size)] * full
            if rest:
                local.append(_generator(self.seed, epoch, k).permutation(size)[:rest])
            parts.append(np.concatenate(local) + self.offsets[k])
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def longest_epoch(self, lengths: Sequence[int], max_tokens: int) -> np.ndarray:
        """Global indices of the longest epoch :meth:`epoch_indices` can draw, counting only samples of at most
        ``max_tokens`` tokens: the same whole passes, and in place of each dataset's random part its longest
        samples (as many as fit). Every epoch's fitting samples, sorted by length, are rank by rank no longer and
        no more than these (what :class:`TokenBudgetBatchSampler` fixes its batch count from)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        parts = []
        for k, (size, w) in enumerate(zip(self.sizes, self.weights)):
            n = int(round(w * size))
            if n == 0 or size == 0:
                continue
            local = lengths[self.offsets[k] : self.offsets[k + 1]]
            fits = np.flatnonzero(local <= max_tokens)
            full, rest = divmod(n, size)
            longest = fits[np.argsort(-local[fits], kind="stable")][:rest]
            parts.append(np.concatenate([fits] * full + [longest]) + self.offsets[k])
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def set_epoch(self, epoch: int) -> None:
        for d in self.datasets:
            if hasattr(d, "set_epoch"):
                d.set_epoch(epoch)
