"""Lightning data module: manifests -> datasets -> token-budget batch samplers -> DataLoaders (exact resume).

Distributed runs need ``Trainer(use_distributed_sampler=False)``: :class:`TokenBudgetBatchSampler` splits batches
across ranks itself (Lightning cannot inject its ``DistributedSampler`` into a token-budget sampler).

Exact resume: the module counts the training batches that reach the model (``on_before_batch_transfer``, in the
main process, so DataLoader prefetching does not inflate it) and saves ``(epoch, batches consumed)`` in
``state_dict``; Lightning stores it in the checkpoint and hands it back on resume, and the sampler then continues
with the next batch. The counts of skipped bad samples travel in the same state. The DataLoaders seed their
iterators from their own generators (:class:`SeededDataLoader`), never from the global torch RNG that dropout and
the checkpoint's RNG states (``callbacks.RngStateCheckpoint``) share.

Ranks must read the same data: each builds the whole batch list from its own reading of the manifests and takes its
share, so a manifest edited between the ranks' starts, or node-local copies that differ, would give ranks other
records (some never trained on, others twice) or other batch counts (a hang at a collective). ``setup`` gathers a
fingerprint of every rank's records and token lengths and refuses differing ones (:class:`RankMismatchError`).
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import math
import multiprocessing
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import DataLoader

from musicflamingo.data.collate import collate, collate_packed
from musicflamingo.data.dataset import BadSample, BadSampleError, BadSampleTracker, ConversationDataset
from musicflamingo.data.index import MODES as INDEX_MODES
from musicflamingo.data.index import load_manifest
from musicflamingo.data.sampler import MixtureDataset, TokenBudgetBatchSampler
from musicflamingo.data.shards import ShardDataset, is_shards

log = logging.getLogger(__name__)

ManifestSpec = str | os.PathLike | Mapping | Sequence


class RankMismatchError(ValueError):
    """Ranks of one run read different training or validation data (or some could not read it at all)."""


def records_fingerprint(records: Sequence[Any]) -> str:
    """A digest of a record sequence: of its per-record digests where it keeps them (``digests`` of
    ``JsonlRecords``, ``JsonListRecords``, ``ShardRecords`` and ``CompactRecords``: every record's bytes), else of its
    length and up to 1024 evenly spread records (a plain list)."""
    h = hashlib.blake2b(str(len(records)).encode(), digest_size=8)
    digests = getattr(records, "digests", None)
    if digests is not None:
        h.update(np.ascontiguousarray(digests).tobytes())
    elif len(records):
        for i in np.unique(np.linspace(0, len(records) - 1, num=min(len(records), 1024)).astype(np.int64)):
            h.update(repr(records[int(i)]).encode())
    return h.hexdigest()


def parse_manifest_spec(spec: ManifestSpec | None, name: str = "train") -> list[tuple[str, float]]:
    """``"a.jsonl"``, ``["a.jsonl", "b.jsonl"]`` or ``[{"path": "a.jsonl", "weight": 2.0}, ...]`` -> ``[(path, weight)]``."""
    if spec is None:
        return []
    if isinstance(spec, (str, os.PathLike, Mapping)):
        spec = [spec]
    out = []
    for i, item in enumerate(spec):
        if isinstance(item, (str, os.PathLike)):
            out.append((os.fspath(item), 1.0))
        elif isinstance(item, Mapping) and "path" in item:
            unknown = set(item) - {"path", "weight"}
            if unknown:
                raise ValueError(f"{name}[{i}]: unknown keys {sorted(unknown)}; expected 'path' and 'weight'")
            weight = item.get("weight", 1.0)
            if (
                isinstance(weight, bool)
                or not isinstance(weight, (int, float))
                or not math.isfinite(weight)
                or weight < 0
            ):
                raise ValueError(f"{name}[{i}].weight must be a finite number >= 0, got {weight!r}")
            out.append((os.fspath(item["path"]), float(weight)))
        else:
            raise ValueError(
                f"{name}[{i}]: expected a manifest path or {{'path': ..., 'weight': ...}}, got {type(item).__name__}"
            )
    return out


def _kill_stray_workers() -> None:
    """At exit, end the daemonic child processes still alive (DataLoader workers), with SIGKILL if SIGTERM does not:
    our workers ignore SIGTERM (`init_worker`), and SIGTERM is all multiprocessing's exit handler sends before
    waiting for them, so a loader iterator still referenced at exit (a run that raised mid-epoch) made the
    interpreter wait forever. Workers only read data: nothing is lost."""
    for proc in multiprocessing.active_children():
        if proc.daemon:
            proc.terminate()
            proc.join(timeout=1)
            if proc.is_alive():
                # torch's SIGCHLD handler would report the killed worker as a failure of a loader we are leaving
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                proc.kill()
                proc.join(timeout=5)


# registered after multiprocessing's own exit handler (imported with torch), so it runs before it (atexit is LIFO)
atexit.register(_kill_stray_workers)


def init_worker(worker_id: int, rank: int = 0) -> None:
    """A DataLoader worker ignores SIGINT and SIGTERM: Ctrl-C reaches the whole process group, and the main process
    stops training at the end of the step (`callbacks.StopOnSignal`), still fetching batches until then; the
    workers end with it. Lightning's per-worker seeding applies as it would without this function."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        pl_worker_init_function(worker_id, rank=rank)


class SeededDataLoader(DataLoader):
    """A DataLoader with its own generator, seeded at every ``iter()`` from ``(seed, batch sampler's epoch, rank)``.

    A DataLoader iterator draws its base seed (its workers' seeds) when it is made: from the global torch RNG
    without a generator. A resumed run makes iterators at other points than an uninterrupted one (Lightning makes
    them again on resume, persistent workers make one per run), so those draws would shift the global stream that
    dropout draws from; with the generator they leave it alone, and an epoch's workers get the same seeds however
    many iterators came before.
    """

    def __init__(self, *args: Any, seed: int, rank: int, **kwargs: Any) -> None:
        super().__init__(*args, generator=torch.Generator(), **kwargs)
        self._seed_keys = (int(seed) & 0xFFFFFFFF, int(rank))

    def __iter__(self) -> Any:
        seed, rank = self._seed_keys
        epoch = int(getattr(self.batch_sampler, "epoch", 0))
        self.generator.manual_seed(int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0]))
        return super().__iter__()


class ResumableDataLoader(SeededDataLoader):
    """A DataLoader that Lightning sees as resumable (``state_dict``/``load_state_dict``).

    Its state is the batch sampler position reported by ``position_fn`` (the data module's count of batches that
    reached the model); loading it positions the sampler. Lightning saves it with the fit loop and restores it
    before iterating, so a mid-epoch checkpoint resumes with the exact next batch.
    """

    def __init__(self, *args: Any, position_fn: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._position_fn = position_fn

    def state_dict(self) -> dict[str, Any]:
        return self._position_fn()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batch_sampler.load_state_dict(state_dict)


class RecordsAt(Sequence):
    """``records[keep[i]]`` as a sequence: the records stay where they are (parsed on access), their per-record
    ``digests`` (where kept) follow."""

    def __init__(self, records: Sequence[Any], keep: np.ndarray) -> None:
        self._records, self._keep = records, keep
        digests = getattr(records, "digests", None)
        if digests is not None:
            self.digests = np.asarray(digests)[keep]

    def __len__(self) -> int:
        return len(self._keep)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self._records[int(j)] for j in self._keep[i]]
        return self._records[int(self._keep[i])]


class RecordSubset(torch.utils.data.Dataset):
    """The samples of ``dataset`` at its indices ``keep``: a data module's ``record_filter`` applied before batching,
    so a batch is the token budget's worth of kept records and an epoch is the kept records."""

    def __init__(self, dataset: Any, keep: np.ndarray) -> None:
        self.dataset, self.keep = dataset, keep
        self.records = RecordsAt(dataset.records, keep)

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[int(self.keep[i])]

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


def _counted(stored: np.ndarray) -> str:
    """How a data set's token lengths were found, for its log line: ``stored`` [N] bool is True where a length was
    a stored count (a shard set's ``shard --processor`` counts, a manifest index's), False where estimated (the
    records tokenized at this launch)."""
    k = int(stored.sum())
    if k and k == len(stored):
        return "stored counts"
    return "estimated" if not k else f"{k} stored counts, {len(stored) - k} estimated"


class MusicFlamingoDataModule(L.LightningDataModule):
    """Train/val DataLoaders of conversations with audio, batched by a padded-token budget.

    Args:
        train: manifest path, list of paths, or list of ``{"path", "weight"}`` (weights: visits per sample and
            epoch, see :class:`~musicflamingo.data.sampler.MixtureDataset`). A path may be a shard folder or URL
            instead (:mod:`musicflamingo.data.shards`).
        val: manifest path(s) for validation (weights ignored), or ``None``.
        processor: a :class:`~musicflamingo.processor.MusicFlamingoProcessor` or a folder to load one from.
        batch_max_tokens: padded tokens per batch and rank (``batch size * longest sample``).
        val_batch_max_tokens: the same for validation (default: ``batch_max_tokens``).
        num_workers: DataLoader worker processes decoding audio in parallel (``persistent_workers`` when > 0).
        train_on_prompt: label every non-audio token instead of only assistant turns.
        bad_sample_policy: ``"error"`` or ``"skip"`` (see :class:`~musicflamingo.data.dataset.ConversationDataset`).
            A sample longer than the token budget is a bad sample too: ``"error"`` stops at setup naming it,
            ``"skip"`` counts and reports it (never decoded) each time its turn comes.
        max_bad_fraction: stop training (``TooManyBadSamplesError``) when more than this share of visited training
            samples was skipped.
        seed: shuffling/mixture seed (same on every rank).
        audio_root: folder relative audio paths are resolved against (default: each manifest's folder).
        max_text_tokens: longest decoder sequence per sample (longer ones are bad samples).
        min_audio_seconds: shorter audio is a bad sample.
        bucket_size_multiplier, drop_last: see :class:`~musicflamingo.data.sampler.TokenBudgetBatchSampler`.
        pin_memory, prefetch_factor: DataLoader options.
        pack: pack conversations into rows (:func:`~musicflamingo.data.collate.collate_packed`): each batch is then
            one row of up to ``batch_max_tokens`` (``val_batch_max_tokens``) tokens, attention within each.
        index: a manifest's ``.index.parquet`` (:mod:`musicflamingo.data.index`): ``"auto"`` takes the lengths from
            it where valid and estimates the rest with a warning, ``"off"`` ignores it, ``"require"`` stops when it
            is missing or stale.
        record_filter: ``record -> bool``, the records to keep, applied when the datasets are built, before the
            token lengths, the token budget's bad samples and the batches: an epoch is the kept records, a record
            left out is never read or refused. None keeps all; where it is None, :meth:`setup` takes the
            LightningModule's ``record_filter`` attribute (GRPO's ``model.tasks``). A filter may have a method
            ``nothing_kept(split, records) -> Exception``, the error to raise when it keeps no record of a split
            (``records``: every record of the split), and ``select(records) -> indices``, which judges them
            without building each record; its ``str`` names it in messages.
    """

    def __init__(
        self,
        train: ManifestSpec,
        val: ManifestSpec | None = None,
        processor: Any = None,
        batch_max_tokens: int = 16384,
        val_batch_max_tokens: int | None = None,
        num_workers: int = 0,
        train_on_prompt: bool = False,
        bad_sample_policy: str = "error",
        max_bad_fraction: float | None = 0.01,
        seed: int = 0,
        audio_root: str | os.PathLike | None = None,
        max_text_tokens: int | None = None,
        min_audio_seconds: float = 0.1,
        bucket_size_multiplier: int = 100,
        drop_last: bool = False,
        pin_memory: bool = False,
        prefetch_factor: int | None = 2,
        pack: bool = False,
        index: str = "auto",
        record_filter: Callable[[Any], bool] | None = None,
    ) -> None:
        super().__init__()
        if processor is None:
            raise ValueError(
                "MusicFlamingoDataModule needs a processor (an object or a folder to load it from)"
            )
        if isinstance(processor, (str, os.PathLike)):
            from musicflamingo.processor import MusicFlamingoProcessor

            processor = MusicFlamingoProcessor.from_pretrained(processor)
        if batch_max_tokens < 1:
            raise ValueError(f"batch_max_tokens must be >= 1, got {batch_max_tokens}")
        if index not in INDEX_MODES:
            raise ValueError(f"index must be one of {', '.join(INDEX_MODES)}, got {index!r}")
        self.index = index
        if val_batch_max_tokens is not None and val_batch_max_tokens < 1:
            raise ValueError(f"val_batch_max_tokens must be >= 1 or None, got {val_batch_max_tokens}")
        self.train_spec = parse_manifest_spec(train, "train")
        if not self.train_spec:
            raise ValueError("MusicFlamingoDataModule needs at least one train manifest")
        self.val_spec = parse_manifest_spec(val, "val")
        self.processor = processor
        self.batch_max_tokens = int(batch_max_tokens)
        self.val_batch_max_tokens = int(
            batch_max_tokens if val_batch_max_tokens is None else val_batch_max_tokens
        )
        # the setting that bounds validation batches, for messages
        self._val_budget = "batch_max_tokens" if val_batch_max_tokens is None else "val_batch_max_tokens"
        self.num_workers = int(num_workers)
        self.dataset_kwargs = dict(
            train_on_prompt=train_on_prompt,
            bad_sample_policy=bad_sample_policy,
            max_text_tokens=max_text_tokens,
            min_audio_seconds=min_audio_seconds,
        )
        self.seed = int(seed)
        self.audio_root = audio_root
        self.bucket_size_multiplier = bucket_size_multiplier
        self.drop_last = drop_last
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.pack = bool(pack)
        self.on_oversized = "carry" if bad_sample_policy == "skip" else "error"
        self.train_bad_samples = BadSampleTracker(max_bad_fraction)
        self.val_bad_samples = BadSampleTracker(None)
        self.train_dataset: MixtureDataset | None = None
        self.val_dataset: MixtureDataset | None = None
        self.train_sampler: TokenBudgetBatchSampler | None = None
        self.val_sampler: TokenBudgetBatchSampler | None = None
        self._epoch = 0  # epoch of the batches counted in _consumed
        self._consumed = 0  # training batches that reached the model in that epoch
        self._pending_sampler_state: dict[str, Any] | None = None
        self.record_filter = record_filter
        self._filter_from_module = False  # the filter is the LightningModule's (taken again at each setup)
        self._built_with: dict[str, Any] = {}  # split -> the record filter its dataset was built with

    def set_record_filter(self, record_filter: Callable[[Any], bool] | None) -> None:
        """Keep only the records ``record_filter`` keeps (None: all); splits built with another filter are built
        again (before any batch: a position loaded into the sampler is not carried over)."""
        self.record_filter, self._filter_from_module = record_filter, False
        stale = self._drop_stale()
        if stale:
            self.setup("fit" if "train" in stale else "validate")

    def _drop_stale(self) -> list[str]:
        """Forget the splits built under another record filter than the current one (built again by setup)."""
        stale = [split for split, f in self._built_with.items() if f != self.record_filter]
        if "train" in stale:
            self.train_dataset = self.train_sampler = None
        if "val" in stale:
            self.val_dataset = self.val_sampler = None
        for split in stale:
            del self._built_with[split]
        return stale

    def _module_filter(self) -> None:
        """Without a record filter of its own, the data module takes the LightningModule's ``record_filter``."""
        if self.record_filter is not None and not self._filter_from_module:
            return
        trainer = getattr(self, "trainer", None)
        module = getattr(trainer, "lightning_module", None) if trainer is not None else None
        if module is not None:
            self.record_filter = getattr(module, "record_filter", None)
            self._filter_from_module = True

    # ------------------------------------------------------------------ building
    def _replicas(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        world, rank = int(trainer.world_size), int(trainer.global_rank)
        connector = getattr(trainer, "_accelerator_connector", None)
        if world > 1 and getattr(connector, "use_distributed_sampler", False):
            raise ValueError(
                "MusicFlamingoDataModule splits batches across ranks itself: create the Trainer with "
                "use_distributed_sampler=False"
            )
        return world, rank

    def _build(self, spec: list[tuple[str, float]], weighted: bool) -> tuple[MixtureDataset, np.ndarray]:
        """The split's mixture and its samples' token lengths [N] int64 (numpy all along: a list of ten million
        Python ints would cost ~0.4 GB and seconds per rank)."""
        split = "train" if weighted else "val"
        keep_fn = self.record_filter
        datasets, lengths, every = [], [], []
        for path, _ in spec:
            if is_shards(path):  # a shard folder or URL (python -m musicflamingo.data shard)
                ds = ShardDataset(path, self.processor, **self.dataset_kwargs)
                keep = None if keep_fn is None else self._kept(ds.records, keep_fn)
                n, stored = ds.token_lengths()
            else:  # lengths from the manifest's index where it is valid (musicflamingo.data.index)
                found = load_manifest(path, self.processor, self.audio_root, self.index)
                ds = ConversationDataset(found.records, self.processor, **self.dataset_kwargs)
                keep = None if keep_fn is None else self._kept(ds.records, keep_fn)
                known = found.tokens
                stored = np.zeros(len(ds), dtype=bool) if known is None else np.asarray(known) >= 0
                if keep is not None and len(keep) < len(ds):
                    # the records left out are never estimated (read): a known length of 0 stands for theirs
                    known = np.full(len(ds), -1, dtype=np.int64) if known is None else np.array(known)
                    known[np.setdiff1d(np.arange(len(ds)), keep)] = 0
                n = np.asarray(ds.estimate_lengths(known, found.seconds), dtype=np.int64)
            every.append(ds.records)
            if keep is not None and len(keep) < len(ds):
                log.info(
                    "%s: the record filter %s keeps %d of its %d records", path, keep_fn, len(keep), len(ds)
                )
                ds, n, stored = RecordSubset(ds, keep), n[keep], stored[keep]
            datasets.append(ds)
            lengths.append(n)
            log.info("%s: %d records, %d tokens (%s)", path, len(ds), int(n.sum()), _counted(stored))
        if keep_fn is not None and not sum(len(ds) for ds in datasets):
            refuse = getattr(keep_fn, "nothing_kept", None)
            if callable(refuse):
                raise refuse(split, (rec for records in every for rec in records))
            raise ValueError(f"data.{split}: the record filter {keep_fn} keeps none of its records")
        weights = [w for _, w in spec] if weighted else None
        names = [f"data.{split}[{k}] ({path})" for k, (path, _) in enumerate(spec)]
        try:
            mixture = MixtureDataset(datasets, weights, lengths=lengths, seed=self.seed, names=names)
        except ValueError as e:  # a weight that draws none of the kept records
            if keep_fn is None:
                raise
            raise ValueError(f"data.{split} under the record filter {keep_fn}: {e}") from None
        return mixture, mixture.lengths

    @staticmethod
    def _kept(records: Sequence[Any], keep_fn: Callable[[Any], bool]) -> np.ndarray:
        # a filter with its own `select(records)` may judge records without building each (grpo.TaskFilter)
        select = getattr(keep_fn, "select", None)
        if callable(select):
            return np.asarray(select(records), dtype=np.int64)
        return np.asarray([i for i, rec in enumerate(records) if keep_fn(rec)], dtype=np.int64)

    def _over_budget(self, mixture: MixtureDataset, lengths: np.ndarray, budget: int, setting: str) -> None:
        """Samples longer than the batch token budget (`data.<setting>`) are bad samples: under
        ``bad_sample_policy="error"`` the first one stops here, named; under ``"skip"`` each gets a
        :class:`BadSample` marker that the sampler hands out with the batches, so it is counted, reported (id,
        ``file:line``) and weighed against ``max_bad_fraction`` every time its turn comes, without being built."""
        over = np.flatnonzero(lengths > budget).tolist()
        if not over:
            return
        records = []
        for i in over:
            k, local = mixture.locate(i)
            records.append((local, mixture.datasets[k].records[local]))
        reason = "{n} tokens, more than data.{setting}={budget}"
        if self.dataset_kwargs["bad_sample_policy"] != "skip":
            _, rec = records[0]
            first = reason.format(n=int(lengths[over[0]]), setting=setting, budget=budget)
            more = f" ({len(over) - 1} more sample(s) too)" if len(over) > 1 else ""
            raise BadSampleError(
                f"sample {rec.id!r} ({rec.source}): {first}{more}; raise data.{setting}, or set "
                "data.bad_sample_policy=skip to count such samples as bad ones and go on"
            )
        for i, (local, rec) in zip(over, records):
            why = reason.format(n=int(lengths[i]), setting=setting, budget=budget)
            mixture.markers[i] = BadSample(index=local, id=rec.id, source=rec.source, reason=why)
        log.warning(
            "%d sample(s) longer than data.%s=%d: skipped as bad samples (bad_sample_policy=skip)",
            len(over),
            setting,
            budget,
        )

    def setup(self, stage: str | None = None) -> None:
        self._module_filter()
        self._drop_stale()
        world, rank = self._replicas()
        built, error = False, None
        try:
            built = self._setup(stage, world, rank)
        except Exception as e:
            error = e  # told to the other ranks, which would otherwise wait for this one at a collective
        if world > 1 and (built or error is not None) and dist.is_available() and dist.is_initialized():
            self._check_ranks_agree(world, rank, error)
        if error is not None:
            raise error

    def _fingerprints(self) -> dict[str, Any]:
        """What this rank read: per manifest its records' and token lengths' digests, and the batch counts."""
        out: dict[str, Any] = {}
        for split, mixture, sampler in (
            ("train", self.train_dataset, self.train_sampler),
            ("val", self.val_dataset, self.val_sampler),
        ):
            if mixture is None:
                continue
            rows = []
            for k, ds in enumerate(mixture.datasets):
                lengths = mixture.lengths[mixture.offsets[k] : mixture.offsets[k + 1]]
                lengths_digest = hashlib.blake2b(np.ascontiguousarray(lengths).tobytes(), digest_size=8)
                rows.append((len(ds), records_fingerprint(ds.records), lengths_digest.hexdigest()))
            out[split] = (rows, sampler.num_batches)
        return out

    def _check_ranks_agree(self, world: int, rank: int, error: BaseException | None) -> None:
        """Gather every rank's :meth:`_fingerprints` (or its setup error) and raise :class:`RankMismatchError` on
        every rank when they differ, naming the manifest and the ranks."""
        mine: dict[str, Any] = (
            {"error": f"{type(error).__name__}: {error}"} if error is not None else self._fingerprints()
        )
        every: list[Any] = [None] * world
        dist.all_gather_object(every, mine)
        failed = [(r, x["error"]) for r, x in enumerate(every) if "error" in x]
        if failed:
            if error is not None:
                return  # this rank raises its own error
            r, message = failed[0]
            raise RankMismatchError(f"rank {r} could not set up its data: {message}")
        problems = []
        for split, spec in (("train", self.train_spec), ("val", self.val_spec)):
            if split not in every[0]:
                continue
            if any(split not in x or len(x[split][0]) != len(spec) for x in every):
                problems.append(f"data.{split}: the ranks were given different manifest lists")
                continue
            for k, (path, _) in enumerate(spec):
                ref = every[0][split][0][k]
                name = f"data.{split}[{k}] ({path})"
                records = [r for r in range(1, world) if every[r][split][0][k][:2] != ref[:2]]
                lengths = [
                    r for r in range(1, world) if every[r][split][0][k][2] != ref[2] and r not in records
                ]
                if records:
                    counts = ", ".join(f"rank {r}: {every[r][split][0][k][0]}" for r in records)
                    problems.append(
                        f"{name}: rank(s) {', '.join(map(str, records))} read other records than rank 0 (records: "
                        f"rank 0: {ref[0]}, {counts}); the manifest was edited between the ranks' starts, or the "
                        "ranks read different files at that path (node-local copies)"
                    )
                if lengths:
                    problems.append(
                        f"{name}: rank(s) {', '.join(map(str, lengths))} found the same records with other token "
                        "lengths than rank 0: the audio files or the manifest's .index.parquet differ between the "
                        "ranks' machines"
                    )
            counts = [every[r][split][1:] for r in range(world)]
            if not problems and len(set(counts)) > 1:
                problems.append(f"data.{split}: batch counts differ between ranks ({counts})")
        if problems:
            raise RankMismatchError(
                "the ranks of this run read different data, so they would train on other batches than planned (some "
                "samples never, others twice) or wait for each other forever: "
                + "; ".join(problems)
                + "; give every rank the same files and start again"
            )

    def _setup(self, stage: str | None, world: int, rank: int) -> bool:
        """Build the datasets and samplers ``stage`` needs and has not built yet; whether it built any."""
        built = False
        if stage in (None, "fit") and self.train_dataset is None:
            built = True
            self.train_dataset, lengths = self._build(self.train_spec, weighted=True)
            self._built_with["train"] = self.record_filter
            self._over_budget(self.train_dataset, lengths, self.batch_max_tokens, "batch_max_tokens")
            try:
                self.train_sampler = TokenBudgetBatchSampler(
                    lengths,
                    self.batch_max_tokens,
                    shuffle=True,
                    seed=self.seed,
                    num_replicas=world,
                    rank=rank,
                    drop_last=self.drop_last,
                    bucket_size_multiplier=self.bucket_size_multiplier,
                    epoch_indices=self.train_dataset.epoch_indices,
                    longest_epoch=self.train_dataset.longest_epoch,
                    on_oversized=self.on_oversized,
                    packed=self.pack,
                )
            except ValueError as e:  # fewer (kept) records than ranks
                if self.record_filter is None:
                    raise
                raise ValueError(f"data.train under the record filter {self.record_filter}: {e}") from None
            if self._pending_sampler_state is not None:
                self.train_sampler.load_state_dict(self._pending_sampler_state)
                self._pending_sampler_state = None
        if stage in (None, "fit", "validate") and self.val_spec and self.val_dataset is None:
            built = True
            self.val_dataset, lengths = self._build(self.val_spec, weighted=False)
            self._built_with["val"] = self.record_filter
            self._over_budget(self.val_dataset, lengths, self.val_batch_max_tokens, self._val_budget)
            try:
                # every validation sample once: padding repeated batches on some ranks would count them twice in
                # val/loss (the ranks' batch counts may differ, nothing is reduced per batch)
                self.val_sampler = TokenBudgetBatchSampler(
                    lengths,
                    self.val_batch_max_tokens,
                    shuffle=False,
                    seed=self.seed,
                    num_replicas=world,
                    rank=rank,
                    on_oversized=self.on_oversized,
                    packed=self.pack,
                    even_ranks=False,
                )
            except ValueError as e:
                raise ValueError(f"data.val: {e}") from None
        return built

    def _loader(self, dataset: MixtureDataset, sampler: TokenBudgetBatchSampler, **kwargs: Any) -> DataLoader:
        workers, pad = self.num_workers, self.processor.pad_token_id
        rank = self._replicas()[1]
        cls = ResumableDataLoader if kwargs else SeededDataLoader
        return cls(
            dataset,
            batch_sampler=sampler,
            collate_fn=partial(collate_packed, max_tokens=sampler.max_tokens, pad_token_id=pad, one_row=True)
            if self.pack
            else partial(collate, pad_token_id=pad),
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if workers > 0 else None,
            worker_init_fn=partial(init_worker, rank=rank) if workers > 0 else None,
            seed=self.seed,
            rank=rank,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        return self._loader(self.train_dataset, self.train_sampler, position_fn=self._sampler_position)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_spec:
            return []
        if self.val_dataset is None:
            self.setup("validate")
        return self._loader(self.val_dataset, self.val_sampler)

    # ------------------------------------------------------------------ batches, bad samples, resume
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count consumed training batches and skipped samples (main process), strip the bookkeeping keys.

        Under DDP the training samples are counted over all ranks (every rank gets as many training batches, so
        each joins the gathering at every batch): every rank's tracker holds the run's counts, so the
        ``max_bad_fraction`` checks stop all ranks at once (one rank stopping alone left the others waiting at
        the next collective), rank 0's report lists every rank's bad samples, and a resume (rank 0's state) counts
        on from the whole run's numbers."""
        if not isinstance(batch, dict):
            return batch
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training:
            if trainer.current_epoch != self._epoch:
                self._epoch, self._consumed = trainer.current_epoch, 0
            self._consumed += 1
            bad = batch.pop("bad_samples", [])
            seen = batch.pop("num_samples", len(batch.get("ids", [])) + len(bad))
            world, rank = self._replicas()
            # only where bad samples are skipped (under "error" the first one stops the run): the gathering is a
            # host sync at every batch
            skip = self.dataset_kwargs["bad_sample_policy"] == "skip"
            if skip and world > 1 and dist.is_available() and dist.is_initialized():
                every: list[Any] = [None] * world
                dist.all_gather_object(every, (int(seen), list(bad)))
                seen, bad = sum(n for n, _ in every), [b for _, found in every for b in found]
            # each bad sample logged once, by rank 0 (the other ranks' consoles show warnings too)
            self.train_bad_samples.update(seen, bad, log_new=rank == 0)
        else:
            self.val_bad_samples.update_from_batch(batch, check=False)
        return batch

    def _sampler_position(self) -> dict[str, Any]:
        if self.train_sampler is None:
            return self._pending_sampler_state or {"epoch": self._epoch, "batches_consumed": self._consumed}
        epoch, consumed = self._epoch, self._consumed
        trainer = getattr(self, "trainer", None)
        if trainer is not None and 0 < trainer.num_training_batches <= consumed:
            # Lightning's epoch is over, also when it ends before the sampler's (trainer.limit_train_batches): the
            # resumed sampler starts the next (a loader with workers iterates before Lightning sets the epoch)
            epoch, consumed = epoch + 1, 0
        return self.train_sampler.state_dict(batches_consumed=consumed, epoch=epoch)

    def state_dict(self) -> dict[str, Any]:
        """Sampler position (also saved through :class:`ResumableDataLoader`; loading it twice is harmless) and
        the bad-sample counts."""
        return {"sampler": self._sampler_position(), "bad_samples": self.train_bad_samples.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sampler = state_dict["sampler"]
        self._epoch, self._consumed = int(sampler["epoch"]), int(sampler["batches_consumed"])
        if "bad_samples" in state_dict:
            self.train_bad_samples.load_state_dict(state_dict["bad_samples"])
        if self.train_sampler is not None:
            self.train_sampler.load_state_dict(sampler)
        else:
            self._pending_sampler_state = dict(sampler)
