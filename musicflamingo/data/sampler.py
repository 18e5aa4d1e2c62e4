"""Token-budget batching and weighted dataset mixtures.

:class:`TokenBudgetBatchSampler` groups samples of similar length so that every batch's padded cost
``len(batch) * max(lengths in batch)`` stays within ``max_tokens`` (lengths are total tokens per sample: text
plus audio placeholders, see :func:`musicflamingo.data.dataset.estimate_num_tokens`). It is deterministic for
``(seed, epoch)``, splits whole batches across ranks, and can resume in the middle of an epoch.

:class:`MixtureDataset` concatenates datasets and draws each epoch's sample list with per-dataset weights.
"""

from __future__ import annotations

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


class TokenBudgetBatchSampler:
    """Length-grouped batches under a padded-token budget, split across data-parallel ranks.

    One epoch: shuffle the sample indices with ``(seed, epoch)``; cut them into buckets of about
    ``bucket_size_multiplier`` batches; sort each bucket by length and fill batches greedily while
    ``(n + 1) * max_len <= max_tokens`` (``packed``: the sum of lengths); shuffle the batch order. Every rank
    builds the same global batch list and takes ``batches[rank::num_replicas]``, so ranks get disjoint samples and
    the same number of batches (the list is padded by repeating its first batches, or truncated with
    ``drop_last``).

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
        packed: the batch's cost is the sum of its lengths instead: one row of
            :func:`~musicflamingo.data.collate.collate_packed` holding up to ``max_tokens`` tokens.
        on_oversized: samples longer than ``max_tokens`` (listed in :attr:`oversized`) raise (``"error"``), are left
            out with a warning (``"skip"``), or are carried along (``"carry"``): each epoch hands them out inside
            the batches of samples that fit, at no token cost, for the dataset to return a bad-sample marker in
            their place (see :attr:`MixtureDataset.markers`), so that they are counted like any bad sample.
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
        on_oversized: str = "error",
        packed: bool = False,
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
        self.packed = bool(packed)
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, batches already consumed on this rank)
        self._yielded = 0
        self._cache: tuple[int, list[list[int]]] | None = None

    @property
    def sampler(self) -> TokenBudgetBatchSampler:
        # Lightning's `_set_sampler_epoch` reaches `set_epoch` through `dataloader.batch_sampler.sampler`.
        return self

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next ``__iter__`` yields."""
        self.epoch = int(epoch)

    def _global_batches(self, epoch: int) -> list[list[int]]:
        """All ranks' batches of ``epoch`` (padded/truncated to a multiple of ``num_replicas``)."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        indices = (
            np.arange(len(self.lengths))
            if self.epoch_indices is None
            else np.asarray(self.epoch_indices(epoch))
        )
        carried = np.zeros(0, dtype=np.int64)
        if self.oversized:
            fits = self.lengths[indices] <= self.max_tokens
            if self.on_oversized == "carry":
                carried = indices[~fits]
            indices = indices[fits]
        rng = _generator(self.seed, epoch)
        if self.shuffle:
            indices = indices[rng.permutation(len(indices))]
        mean_len = float(self.lengths[indices].mean()) if len(indices) else 1.0
        bucket = max(1, int(self.bucket_size_multiplier * max(1.0, self.max_tokens / mean_len)))
        batches: list[list[int]] = []
        for start in range(0, len(indices), bucket):
            chunk = indices[start : start + bucket]
            # Stable sort keeps the shuffled order among equal lengths (and index order without shuffle).
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batch: list[int] = []
            longest = total = 0
            for i in chunk.tolist():
                n = int(self.lengths[i])
                cost = total + n if self.packed else (len(batch) + 1) * max(longest, n)
                if batch and cost > self.max_tokens:
                    batches.append(batch)
                    batch, longest, total = [], 0, 0
                batch.append(i)
                longest, total = max(longest, n), total + n
            if batch:
                batches.append(batch)
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
        remainder = len(batches) % self.num_replicas
        if remainder and self.drop_last:
            batches = batches[: len(batches) - remainder]
        elif remainder:
            need = self.num_replicas - remainder
            batches = batches + [batches[j % len(batches)] for j in range(need)]
        self._cache = (epoch, batches)
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

    def __len__(self) -> int:
        """Batches per rank in the current epoch (the full epoch, also when resuming inside it)."""
        return len(self._global_batches(self.epoch)) // self.num_replicas

    def state_dict(self, batches_consumed: int | None = None) -> dict[str, Any]:
        """Position inside the epoch. ``batches_consumed`` defaults to the batches ``__iter__`` handed out,
        which runs ahead of training when a DataLoader prefetches: the training loop should pass its own count."""
        return {
            "epoch": self.epoch,
            "batches_consumed": self._yielded if batches_consumed is None else int(batches_consumed),
            "seed": self.seed,
            "num_replicas": self.num_replicas,
            "num_samples": len(self.lengths),
            "max_tokens": self.max_tokens,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue epoch ``state["epoch"]`` with the batch after the ``batches_consumed`` already trained on."""
        now = {"seed": self.seed, "num_replicas": self.num_replicas, "num_samples": len(self.lengths)}
        now["max_tokens"] = self.max_tokens
        for key, value in now.items():
            if key in state and state[key] != value:
                raise ValueError(
                    f"cannot resume the batch sampler exactly: {key} was {state[key]} when saved, now {value}"
                )
        self.epoch = int(state["epoch"])
        self._resume = (self.epoch, int(state["batches_consumed"]))


class MixtureDataset(Dataset):
    """Concatenation of datasets whose epochs are weighted draws.

    ``weights[k]`` is how often each sample of dataset ``k`` is visited per epoch on average: ``1`` = once,
    ``2.0`` = twice (upsampling a small set), ``0.25`` = a fresh random quarter each epoch. Dataset ``k`` then
    contributes ``round(weights[k] * len(datasets[k]))`` indices to epoch ``e``, drawn deterministically from
    ``(seed, e, k)``: whole passes over it plus a random subset without replacement. Use :meth:`epoch_indices` as
    the sampler's ``epoch_indices`` and :attr:`lengths` as its lengths.
    """

    def __init__(
        self,
        datasets: Sequence[Dataset],
        weights: Sequence[float] | None = None,
        lengths: Sequence[Sequence[int]] | None = None,
        seed: int = 0,
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

    def set_epoch(self, epoch: int) -> None:
        for d in self.datasets:
            if hasattr(d, "set_epoch"):
                d.set_epoch(epoch)
