"""GRPO with verifiable rewards, the paper's last stage (arXiv 2511.10289, section 3.3), as a LightningModule.

One training step is one batch of the usual data module (each DDP rank its own prompts):

1. Prompts: each record's conversation up to its last answer, rendered exactly as inference renders it (think
   mode: the last user turn gets `chat.THINK_SUFFIX`); the batch brings the audio features.
2. Rollouts: the prompts are embedded once (the audio encoded once per prompt) and each is admitted
   `group_size` times into the generation engine (`musicflamingo.engine`, the one generation path), sampled with
   the config's temperature, top-p, top-k and max new tokens from a generator seeded by (seed, step, rank), so a
   resumed run samples what the uninterrupted run would have.
3. Rewards: each completion is parsed (`reasoning.parse_think` where the prompt asks for the think layout: think
   mode, or a record whose last question carries the suffix itself; else it is all answer) and scored by the
   rewards that apply to its record (`musicflamingo.rewards`); its reward is their weighted sum.
4. Advantages, per prompt's group: A = (r - mean) / (std + eps), std the sample standard deviation. A group whose
   rewards are all equal (and finite) has nothing to teach: it is left out of the loss (no policy and no KL gradient)
   and counted; one with a NaN or infinite reward makes the loss non-finite. A step where every group is left out
   changes nothing (the optimizer steps without gradients).
5. Loss, token level over the completion tokens only (prompt and padding masked), log-probs at the sampling
   temperature::

       ratio_t = exp(logp_t - old_t)
       loss_t  = -min(ratio_t * A, clip(ratio_t, 1 - clip_eps, 1 + clip_eps) * A)
                 + beta * (exp(ref_t - logp_t) - (ref_t - logp_t) - 1)        # k3 estimate of KL(policy || ref)
       loss    = sum_t loss_t / (completion tokens of the batch's groups that are not tied, all ranks)

   Every token weighs the same, whichever completion it is in (as DAPO does; DeepSeekMath's GRPO averages
   each completion's tokens first, so a long completion's tokens weigh less), and tied groups do not dilute it.

   `old` is the policy that sampled: with `updates_per_batch=1` the current one (ratio 1, the plain policy
   gradient, nothing clipped); with more, the rollouts serve that many optimizer steps and the ratio moves. The
   reference: with LoRA, the same weights with the adapters off (no second copy); with full fine-tuning, a frozen
   copy made at start of what trains, frozen parts shared (`reference_dtype: bfloat16` halves it, copying those
   too); `beta: 0` needs none.

Optimization is manual (micro-batches of `micro_batch_size` completions, whole groups or, below `group_size`, pieces
of one, each its own backward):
`trainer.gradient_clip_val` must be null, `loss.max_grad_norm` clips. Checkpoints and resume are the SFT ones
(optimizer, schedule, data position), plus a fingerprint of the frozen reference: a resume must rebuild the same one;
the rollout settings (`ROLLOUT_SETTINGS`: model.seed, model.rollout.*, model.think) and what the loss is made of
(`LOSS_SETTINGS`: model.loss.* but micro_batch_size, which only splits the same sum; model.rewards.*), a change of
which is refused (the run would no longer be the uninterrupted one) unless `model.accept_setting_changes=true` (or
its former name `model.accept_rollout_changes=true`).
Every record's id and reward fields are checked when the fit starts. Metric keys: `train/loss`, `train/reward`, `train/reward/<name>`,
`train/reward_std` (the mean over groups of each group's reward std, what the advantages are divided by), `train/kl`,
`train/clip_fraction`, `train/completion_length`, `train/truncated`, `train/think_length` (think mode: the
thinking's tokens, 0 without any), `train/zero_variance_groups`,
`train/samples_per_s`, `train/grad_norm`, `train/optimizer_step` (the loggers' `step` counts batches, each of
`updates_per_batch` optimizer steps); `val/reward` and `val/reward/<name>` (greedy, one sample per prompt,
means over the whole validation set). Under DDP each is over every rank's rollouts, as the loss is.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import inspect
import json
import logging
import math
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

from musicflamingo.audio.features import tokens_from_frames
from musicflamingo.chat import (
    THINK_SUFFIX,
    encode_expanded,
    ensure_think_prompt,
)
from musicflamingo.checkpoint import stop_ids
from musicflamingo.data.dataset import chat_messages
from musicflamingo.data.manifest import JsonlRecords, Record
from musicflamingo.engine import AnswerText, Engine, Request, SamplingParams, check_stop_strings
from musicflamingo.lit import CheckpointMismatchError, MusicFlamingoLit
from musicflamingo.model import MusicFlamingo
from musicflamingo.model.lora import adapter_layers
from musicflamingo.reasoning import (
    TagsKept,
    ThinkOutput,
    parse_think,
    plain_output,
)  # TagsKept: grpo.TagsKept too
from musicflamingo.rewards import AccuracyReward, CaptionFactsReward, FormatReward, Target, record_task
from musicflamingo.runtime import parse_dtype
from musicflamingo.settings import GRPO_FSDP

log = logging.getLogger(__name__)

# batches in a row with every group tied (no gradient) after which a run is warned that nothing trains
ALL_TIED_WARN_AFTER = 5
ROLLOUT_KEYS = ("group_size", "max_new_tokens", "temperature", "top_p", "top_k", "slots")
LOSS_KEYS = ("beta", "clip_eps", "updates_per_batch", "micro_batch_size", "max_grad_norm")
# setting -> GRPOLit attribute: what the rollouts are sampled with, saved in checkpoints and compared on resume (slots
# too: the completions decoding together share one generator's draws)
ROLLOUT_SETTINGS = {
    "model.seed": "seed",
    "model.rollout.group_size": "group_size",
    "model.rollout.temperature": "temperature",
    "model.rollout.top_p": "top_p",
    "model.rollout.top_k": "top_k",
    "model.rollout.max_new_tokens": "max_new_tokens",
    "model.rollout.slots": "slots",
    "model.think": "think",
}
# setting -> GRPOLit attribute: what the loss of given rollouts is made of, saved in checkpoints and compared on resume
# (with each reward's class and settings, `_reward_settings`). Not micro_batch_size: it only splits the same sum of
# token terms into backward passes (the same update up to rounding, tests/test_grpo_review16.py)
LOSS_SETTINGS = {
    "model.loss.beta": "beta",
    "model.loss.clip_eps": "clip_eps",
    "model.loss.updates_per_batch": "updates_per_batch",
    "model.loss.max_grad_norm": "max_grad_norm",
}
# a checkpoint's key: its rewards' settings hold lists, mappings and named functions too (`_plain_setting`)
REWARD_SETTINGS_V2 = "grpo_reward_settings_v2"
ADVANTAGE_EPS = 1e-4


class GRPOConfigError(ValueError):
    """A GRPO setting that cannot work (the message names the `model.` key and the value)."""


# ---------------------------------------------------------------------------------------------- the math
def group_advantages(rewards: torch.Tensor, eps: float = ADVANTAGE_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards (B, G) -> (advantages (B, G), zero_variance (B,) bool).

    Within each group: (r - mean) / (std + eps), std the sample standard deviation; a group whose rewards are all
    equal (and finite) gets zeros and is flagged. A group holding a NaN or an infinite reward gets NaN advantages,
    so the loss is not finite and `model.nonfinite_loss` decides (a group of equal infinities was left out
    silently, as if it had tied).
    """
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be (prompts, group_size >= 2), got shape {tuple(rewards.shape)}")
    r = rewards.double()
    finite = torch.isfinite(r).all(dim=1)
    zero = (r == r[:, :1]).all(dim=1) & finite
    adv = (r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, keepdim=True) + eps)
    adv = torch.where(zero[:, None], torch.zeros_like(adv), adv)
    adv = torch.where(finite[:, None], adv, torch.full_like(adv, math.nan))
    return adv.to(rewards.dtype), zero


def token_terms(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    clip_eps: float,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Per completion token (all (M,)): the loss term, the k3 KL estimate (None without a reference) and whether
    the ratio was clipped (the clipped side was the smaller one)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages
    loss = -torch.minimum(unclipped, clipped)
    kl = None
    if ref_logp is not None:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1
        if beta:
            loss = loss + beta * kl
    was_clipped = ((ratio < 1 - clip_eps) & (advantages < 0)) | ((ratio > 1 + clip_eps) & (advantages > 0))
    return loss, kl, was_clipped


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    beta: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The token-level GRPO loss of one batch: logp, old_logp, ref_logp (N, T) per-token log-probs of the
    completions, advantages (N,), mask (N, T) true on completion tokens. Returns (loss, {kl, clip_fraction}),
    loss = sum of the masked per-token terms / number of completion tokens."""
    m = mask.bool()
    adv = advantages[:, None].expand_as(logp)
    loss, kl, clipped = token_terms(
        logp[m], old_logp[m], None if ref_logp is None else ref_logp[m], adv[m], clip_eps, beta
    )
    n = max(int(m.sum()), 1)
    stats = {"clip_fraction": float(clipped.sum()) / n}
    if kl is not None:
        stats["kl"] = float(kl.detach().sum()) / n
    return loss.sum() / n, stats


def build_sequences(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], owner: Sequence[int], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sequence n = prompts[owner[n]] + completions[n], right-padded with `pad_id`.

    Returns input_ids (N, T) long, attention_mask (N, T) long (1 = real token), completion_mask (N, T) bool (true
    on completion tokens only: never on the prompt or the padding) and prompt lengths (N,) long.
    """
    rows = [list(prompts[o]) + list(c) for o, c in zip(owner, completions)]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), T), dtype=torch.long)
    completion = torch.zeros((len(rows), T), dtype=torch.bool)
    plen = torch.tensor([len(prompts[o]) for o in owner], dtype=torch.long)
    for n, row in enumerate(rows):
        ids[n, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention[n, : len(row)] = 1
        completion[n, int(plen[n]) : len(row)] = True
    return ids, attention, completion, plen


def token_logprobs(
    hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, temperature: float = 1.0, chunk: int = 1024
) -> torch.Tensor:
    """log softmax(head(hidden) / temperature)[target] per row: hidden (M, D), targets (M,) -> (M,) float32.

    Chunks of `chunk` rows; under autograd each chunk is checkpointed, so its float32 logits are not kept.
    """
    out = []
    for i in range(0, hidden.shape[0], chunk):
        hc, yc = hidden[i : i + chunk], targets[i : i + chunk]
        if torch.is_grad_enabled() and hc.requires_grad:
            out.append(
                torch.utils.checkpoint.checkpoint(
                    _chunk_logprobs, head, hc, yc, temperature, use_reentrant=False
                )
            )
        else:
            out.append(_chunk_logprobs(head, hc, yc, temperature))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def _chunk_logprobs(head: nn.Module, h: torch.Tensor, y: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = head(h).float() / temperature
    return logits.log_softmax(-1).gather(-1, y[:, None]).squeeze(-1)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Every LoRA adapter of `model` (QLoRA's too) off (scale 0) inside the block: the base model, bit for bit (the
    adapter path adds an exact zero)."""
    layers = adapter_layers(model)
    scales = [m.scale for m in layers]
    try:
        for m in layers:
            m.scale = 0.0
        yield
    finally:
        for m, s in zip(layers, scales):
            m.scale = s


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """`model` in eval mode inside the block, back to the mode it was in after: the rollouts and the no-grad
    log-prob passes (the sampling policy's, the reference's) run between training-mode updates."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def sound_runs(ids: torch.Tensor, audio_token_id: int) -> list[int]:
    """Lengths of the runs of `audio_token_id` in ids (S,): the `<sound>` count of each audio, in order."""
    is_audio = (ids == audio_token_id).to(torch.int8)
    edges = torch.diff(F.pad(is_audio, (1, 1)))
    starts, ends = (edges == 1).nonzero().flatten(), (edges == -1).nonzero().flatten()
    return (ends - starts).tolist()


def windows_per_sample(features_mask: torch.Tensor | None, audio_tokens: Sequence[int]) -> list[slice]:
    """Each sample's rows of a batch's concatenated windows, from the windows' frame mask (W, F) and each
    sample's audio tokens (windows are stacked in sample order; a window's tokens follow from its frames)."""
    per_window = [] if features_mask is None else [tokens_from_frames(int(n)) for n in features_mask.sum(-1)]
    out, w = [], 0
    for need in audio_tokens:
        start, got = w, 0
        while got < need and w < len(per_window):
            got, w = got + per_window[w], w + 1
        if got != need:
            raise RuntimeError(f"the batch's audio windows do not add up to {need} audio tokens for a sample")
        out.append(slice(start, w))
    return out


def rollout_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def weights_fingerprint(net: nn.Module, samples: int = 4096) -> list[float]:
    """Per parameter, the float64 sum of at most ~`samples` evenly spaced values: cheap (hashing the release's
    33 GB would take minutes) and enough to tell a checkpoint from a random init or another checkpoint."""
    out = []
    for p in net.parameters():
        flat = p.detach().reshape(-1)
        out.append(float(flat[:: max(1, flat.numel() // samples)].double().sum()))
    return out


# ---------------------------------------------------------------------------------------------- the module
@dataclass
class Prompt:
    """One record to sample for: its prompt ids, what is right, its rows of the batch's audio windows, where it
    is (`file:line`, for errors; ids may repeat) and whether the prompt asks for the think layout (its completions
    are then parsed by `parse_think`; None: as `model.think` says)."""

    id: str
    ids: list[int]
    target: Target
    windows: slice
    source: str = ""
    think: bool | None = None


@dataclass
class Rollouts:
    """A batch's prompts and completions: completions[b][g] are token ids (the stop id included when one ended
    it), outputs[b][g] their parses, rewards (B, G) and each reward's values (None where it does not apply)."""

    prompts: list[Prompt]
    completions: list[list[list[int]]]
    outputs: list[list[ThinkOutput]]
    rewards: torch.Tensor
    components: dict[str, list[float | None]]
    # prompt index -> "model.rewards.<name> returned nan for record ..." (the first non-finite reward of its group)
    nonfinite: dict[int, str] = field(default_factory=dict)
    # completions that ran out of max_new_tokens (no stop id, no stop string ended them)
    truncated: int = 0
    # completions of prompts that ask for the think layout, and their thinking's tokens (0 where there is none)
    think_completions: int = 0
    think_tokens: int = 0


def frozen_copy(net: MusicFlamingo, dtype: torch.dtype | None = None) -> MusicFlamingo:
    """A frozen, eval-mode copy of `net` whose parameters are made directly in `dtype` (None: their own): the
    release in float32 is 33 GB, and a deepcopy cast afterwards held a second 33 GB before the cast.

    With `dtype` None, `net`'s frozen parameters (a frozen audio tower: about 2.5 GB of the release in float32)
    are shared, not copied: they never move, and the copy follows the policy's dtype and device
    (`GRPOLit.on_fit_start`), which casts them in place with the policy. In another dtype they are copied (a cast
    of shared ones would cast the policy's)."""
    memo: dict[int, Any] = {
        id(p): p
        if dtype is None and not p.requires_grad
        else nn.Parameter(p.detach().to(dtype or p.dtype, copy=True), requires_grad=False)
        for p in net.parameters()
    }
    ref = copy.deepcopy(net, memo).eval()
    if dtype is not None:
        ref.to(dtype)  # the buffers; the float32 rotary tables are recomputed below
        ref.reset_buffers()
    return ref


class RecordTable(Mapping):
    """A split's records by their `file:line` source (a batch brings sources, not records), as arrays: the sorted
    16-byte digests of the sources [N] and each one's place among the datasets' records [N]. A record and its
    target are made when looked up. A dict of every record and target held millions of Python objects at scale,
    which each DataLoader worker then copied page by page as reference counts touched them. A source met again (a
    manifest listed twice) stands for its first record.

    Build it by exhausting :meth:`scan`, which yields each source's first record in manifest order (to check them
    as they pass).
    """

    def __init__(self, datasets: Sequence[Any]) -> None:
        self._datasets = list(datasets)
        self._offsets = np.cumsum([0, *(len(ds.records) for ds in self._datasets)], dtype=np.int64)
        self._keys = np.zeros(0, dtype="S16")  # sorted digests
        self._rows = np.zeros(0, dtype=np.int64)  # each digest's record, counted across the datasets

    def scan(self) -> Iterator[Record]:
        digests = bytearray(16 * int(self._offsets[-1]))
        first = np.zeros(int(self._offsets[-1]), dtype=bool)
        seen: set[bytes] = set()  # while scanning only
        g = 0
        for ds in self._datasets:
            for rec in ds.records:
                key = _source_key(rec.source)
                digests[16 * g : 16 * g + 16] = key
                if key not in seen:
                    seen.add(key)
                    first[g] = True
                    yield rec
                g += 1
        del seen
        keys = np.frombuffer(bytes(digests), dtype="S16")[first]
        order = np.argsort(keys, kind="stable")
        self._keys, self._rows = keys[order], np.flatnonzero(first)[order]

    @property
    def size(self) -> int:
        """The records :meth:`scan` reads (a source met again counted each time)."""
        return int(self._offsets[-1])

    def _record(self, row: int) -> Record:
        k = int(np.searchsorted(self._offsets, row, side="right")) - 1
        return self._datasets[k].records[row - int(self._offsets[k])]

    def _find(self, source: object) -> Record | None:
        if not isinstance(source, str) or not len(self._keys):
            return None
        key = np.frombuffer(_source_key(source), dtype="S16")
        pos = int(np.searchsorted(self._keys, key)[0])
        if pos >= len(self._keys) or self._keys[pos] != key[0]:
            return None
        rec = self._record(int(self._rows[pos]))
        return rec if rec.source == source else None

    def __getitem__(self, source: str) -> tuple[Record, Target]:
        rec = self._find(source)
        if rec is None:
            raise KeyError(source)
        return rec, _target(rec)

    def __contains__(self, source: object) -> bool:
        return self._find(source) is not None

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[str]:
        return (self._record(int(row)).source for row in np.sort(self._rows))


PROGRESS_EVERY_S = 30.0  # the record check's progress lines (~150 us a record: minutes at a million)


def _progress(records: Iterator[Record], total: int, what: str) -> Iterator[Record]:
    """`records` as they pass, logging `what` with the count done every `PROGRESS_EVERY_S` seconds and, when it took
    that long, at the end (the check at fit start ran minutes on a large manifest and printed nothing)."""
    start = last = time.monotonic()
    done = 0
    for rec in records:
        yield rec
        done += 1
        now = time.monotonic()
        if now - last >= PROGRESS_EVERY_S:
            last = now
            rate = done / max(now - start, 1e-9)
            log.info(
                "%s: %d of %d records (%.0f%%), about %.0f s left",
                what,
                done,
                total,
                100.0 * done / max(total, 1),
                max(total - done, 0) / rate,
            )
    took = time.monotonic() - start
    if took >= PROGRESS_EVERY_S:
        log.info("%s: %d records in %.0f s", what, done, took)


def _source_key(source: str) -> bytes:
    return hashlib.blake2b(source.encode("utf-8", "surrogatepass"), digest_size=16).digest()


@dataclass(frozen=True)
class TaskFilter:
    """`model.tasks` as the data module's record filter (`MusicFlamingoDataModule.record_filter`): a record is kept
    when its `task` or kind (`qa`, `caption`) is listed. Applied when the data module builds its datasets, before
    batching: a batch is the token budget's worth of kept records, an epoch the kept records, and a record left out
    is never read (nor refused as longer than the token budget)."""

    tasks: frozenset[str]

    def __call__(self, rec: Record) -> bool:
        return bool(set(record_task(rec.extra)) & self.tasks)

    def select(self, records: Sequence[Record]) -> list[int]:
        """The indices of the kept ``records`` (what the data module calls). A manifest's records, read from their
        file, are judged by their line's raw ``task`` field, which is ``Record.extra["task"]``: building each record
        to read that one field (JSON, messages, audio paths) cost ~12x the raw read, seconds per 100k records at
        setup. A line that is no JSON object is built, so it raises its own named error."""
        if not isinstance(records, JsonlRecords):
            return [i for i, rec in enumerate(records) if self(rec)]
        kept = []
        for i in range(len(records)):
            try:
                obj = json.loads(records.text(i))
            except ValueError:  # not JSON, not UTF-8: records[i] names the line and why
                obj = None
            extra = obj if isinstance(obj, dict) else records[i].extra
            if set(record_task({"task": extra.get("task")})) & self.tasks:
                kept.append(i)
        return kept

    def __str__(self) -> str:
        return f"model.tasks={sorted(self.tasks)}"

    def nothing_kept(self, split: str, records: Iterable[Record]) -> GRPOConfigError:
        """The error of a split none of whose records is kept, naming the tasks there are."""
        found = sorted({t for rec in records for t in record_task(rec.extra)})
        return GRPOConfigError(
            f"{self} keeps no record of the data.{split} manifests (their tasks: {', '.join(found) or 'none'})"
        )


class GRPOLit(MusicFlamingoLit):
    """GRPO on the data module's records (see the module docstring); optimizer groups, schedule and export are
    the SFT module's.

    Args:
        net, optimizer, scheduler, part_lr, nonfinite_loss: as `MusicFlamingoLit`.
        rewards: `{name: reward}` (`musicflamingo.rewards`); a null entry is left out (an experiment can drop
            one its parent config sets).
        rollout: `{group_size, max_new_tokens, temperature, top_p, top_k, slots}` (`slots`: completions decoded
            at once, null: all of a batch's).
        loss: `{beta, clip_eps, updates_per_batch, micro_batch_size, max_grad_norm}` (`micro_batch_size`:
            completions per forward/backward: whole groups, rounded down to a multiple of `group_size`, or below
            `group_size` each group in pieces of that many; `max_grad_norm` null: no clipping).
        think: prompts get the think suffix and completions are parsed as `<think>..</think><answer>..</answer>`.
        tasks: train only on records whose `task` (or kind, `qa`/`caption`) is listed (a string: that one task);
            null: all. The data module applies it when it builds its datasets (`TaskFilter`, its
            `record_filter`): a batch is the token budget's worth of kept records, an epoch the kept records.
        reference_dtype: dtype of the frozen reference copy of full fine-tuning (null: the model's).
        seed: the rollouts' seed (with the step and the rank).
        accept_setting_changes: a resume may change what the rollouts are sampled with (`ROLLOUT_SETTINGS`) and
            what the loss is made of (`LOSS_SETTINGS`, the rewards; refused by default, as the resumed run would no
            longer train what the uninterrupted one did): `model.accept_setting_changes=true` on the resuming
            command.
        accept_rollout_changes: the former name of `accept_setting_changes` (either one true accepts).
    """

    # a resume's data order: the epochs are the records model.tasks keeps (a changed filter changes their count)
    _DATA_ORDER = {
        **MusicFlamingoLit._DATA_ORDER,
        "num_samples": "{} training samples per epoch (data.train: its records and weights, and model.tasks)",
    }

    def __init__(
        self,
        net: MusicFlamingo,
        optimizer: Callable[[Iterable[dict[str, Any]]], torch.optim.Optimizer],
        scheduler: Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler],
        part_lr: Mapping[str, float | None],
        nonfinite_loss: str,
        rewards: Mapping[str, Any],
        rollout: Mapping[str, Any],
        loss: Mapping[str, Any],
        think: bool,
        tasks: Sequence[str] | None,
        reference_dtype: str | None,
        seed: int,
        accept_rollout_changes: bool = False,
        accept_setting_changes: bool = False,
    ) -> None:
        super().__init__(net, optimizer, scheduler, part_lr, nonfinite_loss)
        self.automatic_optimization = False
        _check_keys("model.rollout", rollout, ROLLOUT_KEYS)
        _check_keys("model.loss", loss, LOSS_KEYS)
        self.rewards = {k: v for k, v in rewards.items() if v is not None}
        if not self.rewards:
            raise GRPOConfigError("model.rewards: no reward is set")
        for name, r in self.rewards.items():
            weight = getattr(r, "weight", None)
            if not callable(r) or isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise GRPOConfigError(
                    f"model.rewards.{name}: expected an object with a numeric `weight` and __call__(output, target), "
                    f"got {type(r).__name__}"
                )
            if not math.isfinite(weight):  # every sample's reward, so every loss, would be NaN
                raise GRPOConfigError(f"model.rewards.{name}.weight={weight}: expected a finite number")
        # every reward 0: every group ties, nothing is learnt
        if not any(r.weight for r in self.rewards.values()):
            raise GRPOConfigError(
                f"model.rewards: every weight is 0 ({', '.join(f'{n}.weight=0' for n in self.rewards)}), so every "
                "completion's reward is 0 and no step learns anything; give a reward a weight"
            )
        self.group_size = _int("model.rollout.group_size", rollout["group_size"], 2)
        self.max_new_tokens = _int("model.rollout.max_new_tokens", rollout["max_new_tokens"], 1)
        self.temperature = _number("model.rollout.temperature", rollout["temperature"], 0.0, strict=True)
        self.top_p, self.top_k = rollout["top_p"], rollout["top_k"]
        try:  # the engine's own checks of top_p and top_k
            SamplingParams(self.max_new_tokens, True, self.temperature, self.top_k, self.top_p)
        except ValueError as e:
            raise GRPOConfigError(f"model.rollout: {e}") from None
        self.slots = None if rollout["slots"] is None else _int("model.rollout.slots", rollout["slots"], 1)
        self.beta = _number("model.loss.beta", loss["beta"], 0.0)
        self.clip_eps = _number("model.loss.clip_eps", loss["clip_eps"], 0.0, strict=True)
        self.updates_per_batch = _int("model.loss.updates_per_batch", loss["updates_per_batch"], 1)
        self.optimizer_steps_per_batch = self.updates_per_batch
        self.micro_batch_size = _int("model.loss.micro_batch_size", loss["micro_batch_size"], 1)
        clip = loss["max_grad_norm"]
        self.max_grad_norm = (
            None if clip is None else _number("model.loss.max_grad_norm", clip, 0.0, strict=True)
        )
        self.think = bool(think)
        format_rewards = [n for n, r in self.rewards.items() if isinstance(r, FormatReward)]
        if format_rewards and not self.think:
            # without think mode no completion has the tags: the reward is 0 for every sample and teaches nothing
            raise GRPOConfigError(
                f"model.rewards.{format_rewards[0]} rewards the think format, but model.think=false: set "
                f"model.rewards.{format_rewards[0]}=null, or model.think=true"
            )
        dropouts = _dropouts(net)
        if dropouts:
            # The clipped ratio and the KL compare log-probs of passes made at different times (rollout, before
            # the updates, each update): with dropout each pass is a different policy, so a ratio of 1 and a KL of
            # 0 at the first update would come out as noise.
            raise GRPOConfigError(
                f"GRPO needs a model without dropout, but {', '.join(dropouts)}: set them to 0 "
                "(model.net.lora.dropout=0; the others in model.net.overrides.audio / .text, or in the "
                "config.json of model.net.init_from, which overrides do not change)"
            )
        if isinstance(tasks, str):  # `model.tasks=mcq` on the command line: one task, not the letters m, c, q
            tasks = [tasks]
        self.tasks = None if tasks is None else {str(t) for t in tasks}
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            # int(None) was a bare TypeError at instantiation (`seed=null`), a negative one numpy's ValueError at
            # the first rollout, after the model was built
            raise GRPOConfigError(
                f"model.seed={seed!r}: expected an integer >= 0 (rollouts are sampled from (seed, step, rank), so a "
                "resumed run samples what the uninterrupted one did; by default it is the top-level seed, which "
                "must then be set, not null)"
            )
        self.seed = seed
        self.accept_rollout_changes = bool(accept_rollout_changes)
        self.accept_setting_changes = bool(accept_setting_changes)
        # QLoRA's adapters count too: a frozen copy of its 4-bit base would lose bitsandbytes' quantization state
        self.uses_lora = bool(adapter_layers(net))
        self._reference: list[MusicFlamingo] = []  # a list: kept out of the state dict and the checkpoints
        if self.beta > 0 and self.uses_lora:
            outside = [n for n, p in net.named_parameters() if p.requires_grad and "lora_" not in n]
            if outside:
                raise GRPOConfigError(
                    f"with LoRA the KL reference is the model with its adapters off, but {outside[0]} (and "
                    f"{len(outside) - 1} more) train outside the adapters, so the reference would move with them: "
                    "freeze them (model.net.freeze.<part>=true) or set model.loss.beta=0"
                )
        if self.beta > 0 and self.uses_lora and _adapters_start_trained(net):
            # a peft folder's adapters (model.net.lora.init_from_peft): the KL pulls towards the model before them
            log.warning(
                "the LoRA adapters start trained (model.net.lora.init_from_peft): with LoRA the KL reference is "
                "the model with its adapters off, the model before them, not the one this run starts from (the KL "
                "at step 0 is not 0, and model.loss.beta=%g pulls the policy back there). To keep the starting "
                "model as the reference, start from a merged folder (the SFT run's export/, as "
                "model.net.init_from) with fresh adapters, or set model.loss.beta=0",
                self.beta,
            )
        self._reference_dtype = parse_dtype(reference_dtype)
        # What the reference was made from, saved in checkpoints: a resume rebuilds the copy from the weights it
        # starts from (model.net.init_from) and must not get another one (a random init gave a KL of 0.2, not 0)
        self._reference_fingerprint: list[float] | None = None
        if self.beta > 0 and not self.uses_lora:
            self._reference_fingerprint = weights_fingerprint(net)
            self._reference.append(frozen_copy(net, self._reference_dtype))
        # split -> (the dataset it was built from, its table)
        self._records: dict[str, tuple[Any, RecordTable]] = {}
        self._samples_per_s: float | None = None
        self._all_tied = 0  # batches in a row whose groups all tied (no gradient), for `_say_all_tied`
        # each group's learning rate at the batch's first update, logged after the update
        self._step_lrs: dict[str, float] = {}
        self._val_sums: list[float] = [0.0] * (2 + 2 * len(self.rewards))  # `_reward_sums` of the validation

    # ------------------------------------------------------------------ setup
    @property
    def reference(self) -> MusicFlamingo | None:
        """The frozen copy of full fine-tuning (None with LoRA or beta 0)."""
        return self._reference[0] if self._reference else None

    def setup(self, stage: str) -> None:
        """After the data module's setup, before any batch: every record checked (`_record_table`). The data module
        applied `model.tasks` when it built its datasets (it takes `record_filter` from this module); one built
        before under another filter (set up by hand) builds them again."""
        super().setup(stage)
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None:
            return
        keep = self.record_filter
        if keep is not None and callable(getattr(dm, "set_record_filter", None)) and dm.record_filter != keep:
            if dm.record_filter is not None:
                raise GRPOConfigError(
                    f"the data module filters its records by {dm.record_filter}, this run by {self.record_filter}: "
                    "give one filter"
                )
            dm.set_record_filter(keep)
        for split in ("train", "val"):
            if getattr(dm, f"{split}_dataset", None) is not None:
                self._record_table(split)

    @property
    def record_filter(self) -> TaskFilter | None:
        """`model.tasks` as the data module's record filter (None: every record)."""
        return None if self.tasks is None else TaskFilter(frozenset(self.tasks))

    def wants(self, rec: Record) -> bool:
        """Whether `model.tasks` keeps the record (its `task` or kind is listed; null keeps all)."""
        keep = self.record_filter
        return keep is None or keep(rec)

    def on_fit_start(self) -> None:
        # Lightning warns that a checkpoint of manual optimization holds the weights after the optimizer step: so
        # do SFT's, and resuming at the next step needs exactly those.
        warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
        if self._reference:
            # Kept out of the module tree, the copy misses the precision plugin's cast: without reference_dtype it
            # takes the policy's dtype as the fit runs it (bf16-true: bfloat16, not the float32 it was built in)
            self._reference[0].to(self.device, self._reference_dtype or self.model.dtype)
            self._reference[0].reset_buffers(self.device)
        if self._trainer is None:  # a module driven by hand (tests): no trainer, no data module to check
            return
        if isinstance(getattr(self.trainer, "strategy", None), FSDPStrategy):
            # Lightning runs a manual-optimization step inside the FSDP root's forward: the rollouts, several
            # backwards and the optimizer steps there hung (no clipping) or stopped at the clip ("expected to be in
            # states IDLE") at the first batch; refused on every rank before the first rollout
            raise GRPOConfigError(GRPO_FSDP)
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            # fp16 loss scaling: a batch whose groups all tie (no gradient) still steps, to keep the step count,
            # and the scaler's step asserts on an optimizer it saw no gradient of (CUDA, after the rollouts)
            raise GRPOConfigError(
                f"trainer.precision={self.trainer.precision!r}: GRPO does not support fp16 loss scaling; use "
                "bf16-mixed, bf16-true or 32-true"
            )
        self._check_step_counts()
        # every record's id, target and reward fields, before the first rollout
        for split in ("train", "val"):
            self._record_table(split)

    def _check_step_counts(self) -> None:
        """With updates_per_batch=n each batch makes n optimizer steps, so the step count moves in jumps of n: a
        trainer.max_steps that is not a multiple of n is overshot (5 stopped at 6), a checkpoint interval that is
        neither a multiple nor a divisor of n is skipped (every 3 steps saved only step 6)."""
        n = self.updates_per_batch
        if n == 1:
            return
        max_steps = self.trainer.max_steps
        if max_steps > 0 and max_steps % n:
            raise GRPOConfigError(
                f"trainer.max_steps={max_steps} with model.loss.updates_per_batch={n}: each batch makes {n} "
                f"optimizer steps, so the step count never equals {max_steps} (the run would stop at "
                f"{(max_steps // n + 1) * n}); use a multiple of {n}"
            )
        for cb in self.trainer.checkpoint_callbacks:
            every = getattr(cb, "_every_n_train_steps", 0) or 0
            if every > 0 and every % n and n % every:
                raise GRPOConfigError(
                    f"callbacks.model_checkpoint.every_n_train_steps={every} with model.loss.updates_per_batch={n}:"
                    f" each batch makes {n} optimizer steps, so a checkpoint would come every {math.lcm(every, n)}"
                    f" steps; use a multiple of {n} (or 1: every batch)"
                )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self._reference_fingerprint is not None:
            checkpoint["grpo_reference"] = self._reference_fingerprint
        checkpoint["grpo_rollout"] = self._rollout_settings()
        checkpoint["grpo_loss"] = self._loss_settings()
        checkpoint[REWARD_SETTINGS_V2] = True
        if (
            self.reference is not None
        ):  # the dtype the reference ran in (model.reference_dtype null: the policy's)
            checkpoint["grpo_reference_dtype"] = self._effective_reference_dtype()

    # a true-precision trainer casts the policy's weights (and so a null reference_dtype's reference) to its dtype
    _TRUE_PRECISION = {"bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64}

    def _effective_reference_dtype(self) -> str:
        """The dtype the frozen reference runs in: model.reference_dtype, or (null) the policy's as the fit runs it;
        the same before the precision plugin's cast (at a resume's load) as after it (at a save)."""
        dtype = self._reference_dtype
        if dtype is None:
            precision = str(getattr(self._trainer, "precision", "")) if self._trainer is not None else ""
            dtype = self._TRUE_PRECISION.get(precision, self.model.dtype)
        return str(dtype).removeprefix("torch.")

    def _rollout_settings(self) -> dict[str, Any]:
        """What the rollouts are sampled with, by setting name (`ROLLOUT_SETTINGS`), as saved in checkpoints."""
        return {name: getattr(self, attr) for name, attr in ROLLOUT_SETTINGS.items()}

    def _loss_settings(self) -> dict[str, Any]:
        """What the loss of given rollouts is made of, by setting name, as saved in checkpoints: `LOSS_SETTINGS`,
        model.reference_dtype where a frozen reference copy is made, and `model.rewards` (`_reward_settings`)."""
        out: dict[str, Any] = {name: getattr(self, attr) for name, attr in LOSS_SETTINGS.items()}
        if self.reference is not None:
            dtype = self._reference_dtype
            out["model.reference_dtype"] = None if dtype is None else str(dtype).removeprefix("torch.")
        out["model.rewards"] = {name: _reward_settings(r) for name, r in self.rewards.items()}
        return out

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuses a resume under other rollout or loss settings (`_check_resumed_settings`), and one whose frozen KL
        reference (made at start from the model's weights) is not the one the run trained against: e.g.
        `ckpt_path=last` without the run's model.net.init_from."""
        super().on_load_checkpoint(checkpoint)
        self._check_resumed_settings(checkpoint)
        saved, now = checkpoint.get("grpo_reference"), self._reference_fingerprint
        if saved is None or now is None:
            return  # no reference then (LoRA, beta 0, an older checkpoint) or none now: nothing to compare
        same = len(saved) == len(now) and all(
            math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6) for a, b in zip(saved, now)
        )
        if not same:
            path = self.trainer.ckpt_path if self._trainer is not None else "the checkpoint"
            raise CheckpointMismatchError(
                f"ckpt_path={path} trained against a KL reference made from other weights than this run starts "
                "from: the frozen reference is rebuilt at start from model.net.init_from (or the preset's random "
                "init), so resume with the model.net.init_from (and model.net settings) that started the run, or "
                "start a new run from its weights (model.net.init_from=<run>/export, another run folder)"
            )

    def _check_resumed_settings(self, checkpoint: Mapping[str, Any]) -> None:
        """A resume continues the uninterrupted run only under the settings that trained it: the rollouts' (seeded by
        (model.seed, step, rank): another model.seed, group size, temperature, top-p, top-k, token limit, slot count
        or think mode) and the loss's (another beta, clip_eps, updates_per_batch, max_grad_norm, reference dtype, or
        reward set, class or weight) were taken silently (`model.seed` is not the top-level seed that data.seed
        refuses). Refused naming each setting and both values, unless `model.accept_setting_changes` (or its former
        name `model.accept_rollout_changes`; then said so in the log). A checkpoint from before a record was saved
        is not compared on it."""
        changed: dict[str, tuple[Any, Any]] = {}
        unchecked: list[str] = []
        saved = checkpoint.get("grpo_rollout")
        if isinstance(saved, Mapping):
            now = self._rollout_settings()
            changed.update(
                {k: (saved[k], v) for k, v in now.items() if k in saved and not _same_value(saved[k], v)}
            )
        saved = checkpoint.get("grpo_loss")
        if isinstance(saved, Mapping):
            now = self._loss_settings()
            rewards_then, rewards_now = saved.get("model.rewards"), now.pop("model.rewards")
            dtype_key = "model.reference_dtype"
            if dtype_key in now and dtype_key in saved:
                # null and the dtype it stands for are the same reference (null then float32 on a float32 model);
                # a checkpoint from before the effective dtype was saved: null stood for the policy's then too
                then, set_now = saved[dtype_key], now.pop(dtype_key)
                runs_then = (
                    checkpoint.get("grpo_reference_dtype") or then or self._effective_reference_dtype()
                )
                runs_now = self._effective_reference_dtype()
                if runs_then != runs_now:
                    changed[dtype_key] = (then, set_now) if then != set_now else (runs_then, runs_now)
            for k, v in now.items():
                if k in saved and not _same_value(saved[k], v):
                    changed[k] = (saved[k], v)
            if (
                "model.loss.clip_eps" in changed
                and self.updates_per_batch == 1
                and _same_value(saved.get("model.loss.updates_per_batch"), 1)
            ):
                # one update per batch of rollouts: the ratio is exactly 1, inside any clip range, so clip_eps
                # changes nothing (neither the gradient nor the logged clip fraction)
                del changed["model.loss.clip_eps"]
            if isinstance(rewards_then, Mapping):
                if not checkpoint.get(REWARD_SETTINGS_V2):  # saved its rewards' scalar settings alone
                    rewards_now = {n: _reward_settings(r, scalars_only=True) for n, r in self.rewards.items()}
                changed.update(_reward_changes(rewards_then, rewards_now))
                unchecked = _unchecked_rewards(self.rewards)
        path = self.trainer.ckpt_path if self._trainer is not None else "the checkpoint"
        unchecked_note = (
            f" ({', '.join(unchecked)}: not compared, as no checkpoint can hold or compare it; resume with the same "
            "one)"
            if unchecked
            else ""
        )
        if not changed:
            if unchecked:
                log.warning(
                    "ckpt_path=%s: the rewards' other settings are the checkpoint's, but %s cannot be compared (not a "
                    "number, string, list or named function): make sure it is what the run trained with",
                    path,
                    ", ".join(unchecked),
                )
            return
        shown = ", ".join(f"{k}={_override(a)} there, {_override(b)} now" for k, (a, b) in changed.items())
        shown += unchecked_note
        if self.accept_setting_changes or self.accept_rollout_changes:
            flag = "accept_setting_changes" if self.accept_setting_changes else "accept_rollout_changes"
            log.warning(
                "ckpt_path=%s was trained with other settings (%s): model.%s=true, so the run continues with the new "
                "ones (from here on it is not the uninterrupted run)",
                path,
                shown,
                flag,
            )
            return
        # a whole reward entry with ++ (adds it where the command's config has none, e.g. one set with +)
        keep = " ".join(
            f"{'++' if isinstance(a, Mapping) or isinstance(b, Mapping) else ''}{k}={_override(a)}"
            for k, (a, b) in changed.items()
        )
        what = "sampled its rollouts" if all(k in ROLLOUT_SETTINGS for k in changed) else "was trained"
        raise CheckpointMismatchError(
            f"ckpt_path={path} {what} with other settings: {shown}. A resume continues the uninterrupted run only "
            f"under the settings that trained it; resume with {keep}, or, to continue this run (its optimizer and "
            "data position) with the new settings anyway, add model.accept_setting_changes=true (its former name "
            "model.accept_rollout_changes=true does the same)"
        )

    def _processor(self) -> Any:
        dm = self.trainer.datamodule if self._trainer is not None else None
        processor = getattr(dm, "processor", None)
        if processor is None:
            raise GRPOConfigError("GRPO needs the data module's processor (data: MusicFlamingoDataModule)")
        return processor

    def _record_table(self, split: str) -> RecordTable:
        """The split's records by `file:line` source with their targets, built once (at fit start): a batch
        brings sources, not records. Ids may repeat (two questions on one clip, or two manifests of the same file
        name without ids, whose default ids `<file name>:<line>` collide); a manifest listed twice is the same
        records. Every record's reward fields are checked up front. Built again when the data module's dataset is
        another object (a module reused over a rebuilt data module, or one whose filter rebuilt it): the table of the
        old one named its records, so the new records went unchecked, and a batch of them was not found."""
        dm = self.trainer.datamodule
        dataset = dm.train_dataset if split == "train" else dm.val_dataset
        built = self._records.get(split)
        if built is None or built[0] is not dataset:
            table = RecordTable(getattr(dataset, "datasets", []))
            records = table.scan()
            if getattr(self._trainer, "global_rank", 0) == 0:  # one line per interval, not one per rank
                records = _progress(
                    records, table.size, f"checking the {split} records' ids and reward fields"
                )
            entries = ((rec, _target(rec)) for rec in records)
            if split == "train":
                self._check_targets(entries)
            else:
                deque(entries, maxlen=0)
            self._records[split] = (dataset, table)
        return self._records[split][1]

    def _check_targets(self, entries: Iterable[tuple[Record, Target]]) -> None:
        """`model.tasks` must keep some record (a filter matching none trained every step on nothing, silently);
        a caption with no facts gets nothing from the caption-facts reward, which is said once. `entries` is read
        once, as it comes (a manifest's records are not held)."""
        kept, found, bare, first_bare, thinking, first_thinking = 0, set(), 0, None, 0, None
        questions, captions = 0, 0  # kept records the accuracy and the caption facts rewards apply to
        for r, t in entries:
            found.update(x for x in (t.task, t.kind) if x)
            if self.tasks is not None and not ({t.task, t.kind} & self.tasks):
                continue
            kept += 1
            questions += t.kind == "qa"
            captions += t.kind == "caption" and bool(t.facts)
            if t.kind == "caption" and not t.facts:
                bare += 1
                first_bare = first_bare or r.source
            if not self.think and self.asks_think(r):
                thinking += 1
                first_thinking = first_thinking or r.source
        if thinking:
            log.warning(
                "model.think=false, but %d record(s) ask for the think layout in their own prompt (the think suffix "
                "ends their last question), first at %s: their completions are scored on their <answer> text",
                thinking,
                first_thinking,
            )
        if self.tasks is not None and not kept:
            raise GRPOConfigError(
                f"model.tasks={sorted(self.tasks)} keeps no record of the training manifests (their tasks: "
                f"{', '.join(sorted(found)) or 'none'})"
            )
        # the rewards of this package that apply to no kept record (other rewards may apply to any)
        idle = {
            n
            for n, r in self.rewards.items()
            if (isinstance(r, AccuracyReward) and not questions)
            or (isinstance(r, CaptionFactsReward) and not captions)
        }
        if kept and all(n in idle or not r.weight for n, r in self.rewards.items()):
            # said, not refused: a reward of one's own may apply where these do not
            log.warning(
                "model.rewards: %s apply to none of the training records (%d question(s), %d caption(s) with "
                "facts) and the others weigh 0: every completion's reward is 0 and no step learns anything; set "
                "the rewards these records need (accuracy: records with an answer; caption_facts: captions with "
                "'facts'; format: think mode)",
                ", ".join(sorted(idle)),
                questions,
                captions,
            )
        if bare and any(isinstance(r, CaptionFactsReward) for r in self.rewards.values()):
            log.warning(
                "%d caption record(s) have no 'facts' (nor a synthetic clip's 'meta'), first at %s: the caption "
                "facts reward does not apply to them",
                bare,
                first_bare,
            )

    # ------------------------------------------------------------------ prompts
    def _prompt_messages(self, record: Record) -> list[dict[str, Any]]:
        """The record's conversation up to its last answer (think mode: the think suffix on the last user turn)."""
        messages = chat_messages(record.messages)
        answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not answers:
            raise ValueError(f"record {record.id!r} ({record.source}): no assistant turn to learn from")
        messages = [dict(m) for m in messages[: answers[-1]]]
        if self.think:
            last = max(i for i, m in enumerate(messages) if m["role"] == "user")
            messages[last]["content"] = ensure_think_prompt(messages[last]["content"])
        return messages

    def asks_think(self, record: Record) -> bool:
        """Whether the record's prompt asks for `<think>..</think><answer>..</answer>`: think mode, or a record in the
        MF-Think layout whose last question carries the think suffix itself. Such a prompt's completions are parsed
        by `parse_think` and their `<answer>` text scored, as `eval.py think=true` scores (with model.think=false the
        whole completion, its reasoning too, was taken for the answer)."""
        if self.think:
            return True
        users = [m for m in self._prompt_messages(record) if m["role"] == "user"]
        return bool(users) and str(users[-1]["content"]).rstrip().endswith(THINK_SUFFIX)

    def prompt_ids(self, record: Record, audio_counts: Sequence[int]) -> list[int]:
        """The record's conversation up to its last answer, as inference renders it (think mode: with the think
        suffix on the last user turn), `<sound>` expanded to `audio_counts`."""
        messages = self._prompt_messages(record)
        processor = self._processor()
        text = processor.render_chat(messages, add_generation_prompt=True)
        return encode_expanded(
            processor.tokenizer, text, audio_counts, processor.audio_token_ids, processor.audio_token
        )

    def batch_prompts(self, batch: Mapping[str, Any], split: str = "train") -> list[Prompt]:
        """The batch's records as prompts (those of other tasks left out). Each row's `<sound>` runs are read from
        its real tokens (the attention mask), so a batch padded on either side gives the same prompts."""
        records = self._record_table(split)
        ids, real = batch["input_ids"], batch["attention_mask"].bool()
        counts = [sound_runs(ids[b][real[b]], self.model.config.audio_token_id) for b in range(ids.shape[0])]
        windows = windows_per_sample(batch.get("input_features_mask"), [sum(c) for c in counts])
        out = []
        for b, source in enumerate(batch["sources"]):
            if source not in records:
                raise KeyError(f"batch record {source!r} is not in the {split} manifests")
            rec, target = records[source]
            if self.tasks is not None and not ({target.task, target.kind} & self.tasks):
                continue  # none left where the data module applied model.tasks (`TaskFilter`)
            ids_b = self.prompt_ids(rec, counts[b])
            out.append(Prompt(rec.id, ids_b, target, windows[b], rec.source, self.asks_think(rec)))
        return out

    def _features(self, batch: Mapping[str, Any], prompts: Sequence[Prompt]) -> tuple[Any, Any]:
        feats, mask = batch.get("input_features"), batch.get("input_features_mask")
        if feats is None:
            return None, None
        rows = [i for p in prompts for i in range(p.windows.start, p.windows.stop)]
        if not rows:
            return None, None
        index = torch.tensor(rows, device=feats.device)
        return feats.index_select(0, index), mask.index_select(0, index)

    # ------------------------------------------------------------------ rollouts
    def _stop_ids(self) -> tuple[int, ...]:
        """The ids that end a completion: exactly those infer.py, eval.py and serve.py stop on
        (`checkpoint.stop_ids`: the config's eos and `model.net.init_from`'s generation_config.json eos ids), the
        config's first. Not the tokenizer's eos: where it differs (a base tokenizer's `<|endoftext|>`), rollouts
        stopped on it and were scored on answers inference never gives, as it decodes on past it."""
        ids = stop_ids(getattr(self.model, "generation_defaults", {}), self.model.config)
        return tuple(dict.fromkeys([i for i in [self.model.config.text.eos_token_id] if i is not None] + ids))

    def rollout_params(self, sample: bool) -> SamplingParams:
        """Training rollouts' sampling (`model.rollout`), or validation's greedy decoding; both end where
        inference ends an answer (stop ids and stop strings)."""
        if sample:
            return SamplingParams(
                self.max_new_tokens,
                True,
                self.temperature,
                self.top_k,
                self.top_p,
                stop_ids=self._stop_ids(),
                stop_strings=self._stop_strings(),
            )
        return SamplingParams(
            self.max_new_tokens, False, stop_ids=self._stop_ids(), stop_strings=self._stop_strings()
        )

    def _stop_strings(self) -> tuple[str, ...]:
        """`model.net.init_from`'s generation_config.json `stop_strings`, which end a completion as they end
        infer.py's, eval.py's and serve.py's answers (the completion keeps the token that completed one; its text,
        scored, is cut before it)."""
        try:
            return check_stop_strings(getattr(self.model, "generation_defaults", {}).get("stop_strings"))
        except ValueError as e:
            raise GRPOConfigError(f"generation_config.json of model.net.init_from: {e}") from None

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Prompt],
        features: torch.Tensor | None,
        features_mask: torch.Tensor | None,
        group_size: int,
        params: SamplingParams,
        generator: torch.Generator | None,
    ) -> list[list[list[int]]]:
        """`group_size` completions per prompt through the engine; each prompt is embedded once (its audio encoded
        once) and admitted `group_size` times. Returns token ids [prompt][sample]."""
        # Without autocast (bf16-mixed training): rollouts run in the weights' dtype, as inference and eval do, so a
        # sample's tokens are those the exported model would generate.
        with eval_mode(self.model), torch.autocast(self.device.type, enabled=False):
            model = self.model
            P = max(len(p.ids) for p in prompts)
            ids = torch.full((len(prompts), P), self._pad_id(), dtype=torch.long, device=self.device)
            for b, p in enumerate(prompts):
                ids[b, : len(p.ids)] = torch.tensor(p.ids, device=self.device)
            embeds = model.embed(ids, features, features_mask)  # (B, P, D): each audio encoded once
            slots = min(self.slots or len(prompts) * group_size, len(prompts) * group_size)
            # A fresh engine per batch: its KV cache is freed before the update needs the memory.
            # the tokenizer matches stop strings on the decoded text (none set: no per-token decoding)
            tokenizer = self._processor().tokenizer if params.stop_strings else None
            engine = Engine(model, slots=slots, capacity=P + params.max_new_tokens, tokenizer=tokenizer)
            queue = deque((b, g) for b in range(len(prompts)) for g in range(group_size))
            out: list[list[list[int]]] = [[[] for _ in range(group_size)] for _ in prompts]
            owner: dict[int, tuple[int, int]] = {}

            def collect(index: int) -> None:
                slot = engine.slots[index]
                if slot is not None and slot.done:
                    b, g = owner.pop(index)
                    out[b][g] = list(slot.tokens)
                    engine.release(index)

            while queue or engine.decoding:
                while queue and engine.free_slots():
                    b, g = queue.popleft()
                    n = len(prompts[b].ids)
                    request = Request(ids[b, :n], params, inputs_embeds=embeds[b, :n], generator=generator)
                    try:
                        slot = engine.admit(request)
                    except ValueError as e:  # a prompt longer than the model's context
                        raise ValueError(f"record {prompts[b].id!r}: {e}") from None
                    owner[slot.index] = (b, g)
                    collect(slot.index)
                for index, _ in engine.step():
                    collect(index)
            return out

    def _pad_id(self) -> int:
        pad = self.model.config.text.pad_token_id
        if pad is None:  # padding is masked out: any id does, the first stop id as the reference's generate()
            pad = next(iter(self._stop_ids()), 0)
        return int(pad)

    def score(self, prompts: Sequence[Prompt], completions: list[list[list[int]]]) -> Rollouts:
        """Parse and reward every completion: a prompt that asks for the think layout (`Prompt.think`; None: as
        `model.think`) by `parse_think` (its `<answer>` text, the whole text where there is no tag), any other as
        all answer. A non-finite reward is named with its record (in `Rollouts.nonfinite` and a warning): it makes
        the group's advantages, and so the loss, NaN."""
        tok = TagsKept.wrap(self._processor().tokenizer)  # the tags as text, special tokens or not
        stops = set(self._stop_ids())
        stop_strings = self._stop_strings()
        truncated = think_completions = think_tokens = 0
        outputs, rewards = [], []
        components: dict[str, list[float | None]] = {name: [] for name in self.rewards}
        nonfinite: dict[int, str] = {}
        for b, (p, group) in enumerate(zip(prompts, completions)):
            think = self.think if p.think is None else p.think
            row_out, row_r = [], []
            for tokens in group:
                # the answer inference gives: up to the stop id or the stop string that ended it (a `</answer>`
                # stop id, as a stop string, is recorded as the stop: the parse then knows the tag was there)
                answer = AnswerText.of_tokens(tok, tokens, stop_strings, stops)
                text, stop = answer.text, answer.stop
                truncated += stop is None and (not tokens or tokens[-1] not in stops)
                # ended by a `</answer>` stop string, the cut text lacks its closing tag: parsed with it
                output = parse_think(text, stop=stop) if think else plain_output(text)
                if think:
                    # the thinking as the tokenizer encodes its text (tags and surrounding spaces left out)
                    think_completions += 1
                    think_tokens += len(tok.encode(output.thinking)) if output.thinking else 0
                total = 0.0
                for name, reward in self.rewards.items():
                    value = _reward_value(name, _call_reward(name, reward, output, p), p)
                    components[name].append(value)
                    if value is not None and not math.isfinite(value) and b not in nonfinite:
                        nonfinite[b] = (
                            f"model.rewards.{name} returned {value} for record {p.id!r} ({p.source or 'no source'})"
                            f" on the completion {output.text!r:.80}"
                        )
                        log.warning("%s: its group's advantages and loss are not finite", nonfinite[b])
                    if value is not None:
                        total += float(reward.weight) * value
                row_out.append(output)
                row_r.append(total)
            outputs.append(row_out)
            rewards.append(row_r)
        return Rollouts(
            list(prompts),
            completions,
            outputs,
            torch.tensor(rewards, dtype=torch.float32),
            components,
            nonfinite,
            truncated,
            think_completions,
            think_tokens,
        )

    # ------------------------------------------------------------------ log-probs
    def sequence_logprobs(
        self,
        model: MusicFlamingo,
        prompts: Sequence[Prompt],
        completions: Sequence[Sequence[int]],
        owner: Sequence[int],
        features: torch.Tensor | None,
        features_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs (M,) of the completions under `model` at the sampling temperature, and each
        token's completion index (M,). Prompts are embedded once each (audio included) and shared by their
        completions; only the positions that predict completion tokens go through the last layer and the head."""
        device = model.device
        pad = self._pad_id()
        P = max(len(p.ids) for p in prompts)
        prompt_ids = torch.full((len(prompts), P), pad, dtype=torch.long, device=device)
        for b, p in enumerate(prompts):
            prompt_ids[b, : len(p.ids)] = torch.tensor(p.ids, device=device)
        prompt_embeds = model.embed(prompt_ids, features, features_mask)  # (B, P, D), audio once per prompt
        ids, attention, completion, plen = build_sequences([p.ids for p in prompts], completions, owner, pad)
        ids, attention, completion, plen = (
            ids.to(device),
            attention.to(device),
            completion.to(device),
            plen.to(device),
        )
        T = ids.shape[1]
        text = model.language_model.embed_tokens(ids)  # (N, T, D)
        shared = F.pad(prompt_embeds[torch.as_tensor(owner, device=device)], (0, 0, 0, max(T - P, 0)))[:, :T]
        is_prompt = torch.arange(T, device=device)[None, :] < plen[:, None]
        x = torch.where(is_prompt[..., None], shared.to(text.dtype), text)
        predicts = F.pad(completion[:, 1:], (0, 1))  # position t predicts token t + 1
        hidden = model.language_model(x, attention_mask=attention, output_rows=predicts)  # (M, D)
        targets = ids[:, 1:][completion[:, 1:]]
        which = completion[:, 1:].nonzero()[:, 0]
        return token_logprobs(hidden, model.lm_head, targets, self.temperature), which

    # ------------------------------------------------------------------ the step
    def _micro_batches(self, keep: Sequence[int]) -> list[list[tuple[int, int]]]:
        """The kept groups' completions `(prompt, sample)` in micro-batches of at most `micro_batch_size`: whole
        groups, as many as fit (each prompt embedded, its audio encoded, once per step), or where one group is
        more than `micro_batch_size` (smaller than `group_size`), each group in pieces of that many (a piece's
        prompt embedded again). The loss is a sum over tokens, so the pieces add up to the whole group's."""
        G, m = self.group_size, self.micro_batch_size
        if m >= G:
            per = m // G
            return [[(b, g) for b in keep[i : i + per] for g in range(G)] for i in range(0, len(keep), per)]
        return [[(b, g) for g in range(s, min(s + m, G))] for b in keep for s in range(0, G, m)]

    def _all_reduce(self, value: torch.Tensor, op: str) -> torch.Tensor:
        if self._trainer is None or self.trainer.world_size == 1:
            return value
        dist = torch.distributed
        value = value.to(self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return value

    def _any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank (this one alone without DDP)."""
        return bool(self._all_reduce(torch.tensor(float(flag), dtype=torch.float32), "max").item() > 0)

    def _group_inputs(
        self, batch: Mapping[str, Any], roll: Rollouts, pairs: Sequence[tuple[int, int]]
    ) -> tuple[list[Prompt], list[list[int]], list[int], Any, Any]:
        """A micro-batch's `(prompt, sample)` completions as `sequence_logprobs` arguments."""
        order = list(dict.fromkeys(b for b, _ in pairs))
        at = {b: j for j, b in enumerate(order)}
        prompts = [roll.prompts[b] for b in order]
        completions = [roll.completions[b][g] for b, g in pairs]
        owner = [at[b] for b, _ in pairs]
        features, mask = self._features(batch, prompts)
        return prompts, completions, owner, features, mask

    def _reference_logprobs(self, *args: Any) -> torch.Tensor | None:
        """Reference log-probs of a micro-batch (`sequence_logprobs` arguments); None with beta 0."""
        if self.beta <= 0:
            return None
        model = self.reference if self.reference is not None else self.model
        off = adapters_disabled(model) if self.reference is None else contextlib.nullcontext()
        with torch.no_grad(), eval_mode(model), off:
            return self.sequence_logprobs(model, *args)[0]

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor | None:
        t0 = time.perf_counter()
        self._samples_per_s = None  # a skipped batch (non-finite loss) logs none, not the previous batch's
        opt = self.optimizers()
        scheduler = self.lr_schedulers()
        # the rates this batch's (first) update steps with: read before the schedule moves them on
        groups = getattr(opt, "optimizer", opt).param_groups
        self._step_lrs = {str(g.get("name", i)): float(g["lr"]) for i, g in enumerate(groups)}
        prompts = self.batch_prompts(batch, "train") if batch["input_ids"].shape[0] else []
        rank = self.trainer.global_rank if self._trainer is not None else 0
        generator = torch.Generator(device=self.device)
        generator.manual_seed(rollout_seed(self.seed, self.global_step, rank))
        params = self.rollout_params(sample=True)
        if prompts:
            features, mask = self._features(batch, prompts)
            completions = self.generate(prompts, features, mask, self.group_size, params, generator)
            roll = self.score(prompts, completions)
            advantages, zero = group_advantages(roll.rewards)
        else:
            roll = Rollouts([], [], [], torch.zeros(0, self.group_size), {k: [] for k in self.rewards})
            advantages, zero = torch.zeros(0, self.group_size), torch.zeros(0, dtype=torch.bool)
        keep = [b for b in range(len(roll.prompts)) if not zero[b]]
        micro = self._micro_batches(keep)
        stops = set(self._stop_ids())
        # Token-level over the batch's groups that are not tied: each rank divides by their completion tokens on
        # all ranks (times the world size, which DDP's gradient averaging divides out again).
        n_tokens = sum(len(t) for b in keep for t in roll.completions[b])
        total_tokens = float(self._all_reduce(torch.tensor(float(n_tokens), dtype=torch.float64), "sum"))
        max_micro = int(self._all_reduce(torch.tensor(float(len(micro)), dtype=torch.float32), "max").item())
        world = self.trainer.world_size if self._trainer is not None else 1
        scale = world / max(total_tokens, 1.0)

        # Reference and sampling-policy log-probs of every kept micro-batch, computed once before any update.
        inputs = [self._group_inputs(batch, roll, mb) for mb in micro]
        refs = [self._reference_logprobs(*inp) for inp in inputs]
        olds: list[torch.Tensor | None] = [None] * len(inputs)
        if self.updates_per_batch > 1:
            olds = [self._no_grad_logprobs(*inp) for inp in inputs]

        stats = {"loss": 0.0, "kl": 0.0, "clipped": 0.0, "tokens": 0.0}
        grad_norm = None
        for update in range(self.updates_per_batch):
            opt.zero_grad(set_to_none=True)
            for k in range(max_micro):
                loss, ids = None, []
                if k < len(inputs):
                    prompts_mb, completions_mb, owner, features, mask = inputs[k]
                    ids = [p.source or p.id for p in prompts_mb]  # file:line (ids may repeat)
                    logp, which = self.sequence_logprobs(self.model, *inputs[k])
                    rows, cols = zip(*micro[k])
                    adv = advantages[list(rows), list(cols)].to(logp.device)[which].to(logp.dtype)
                    old = logp.detach() if olds[k] is None else olds[k]
                    loss_terms, kl, clipped = token_terms(logp, old, refs[k], adv, self.clip_eps, self.beta)
                    loss = loss_terms.sum() * scale
                    if features is None and self._distributed() and self._audio_trains():
                        # a text-only micro-batch leaves the trained audio tower/projector without gradients on this
                        # rank (find_unused_parameters=false: the others waited in the gradient all-reduce); the
                        # stand-in window's audio path, weight zero, reaches them (`MusicFlamingoLit._forward`)
                        loss = loss + self._stand_in_audio_loss()
                # every rank takes the same decision before any backward: one skipping alone left the others
                # waiting in the gradient all-reduce (a hang until the process group's timeout)
                bad = loss is not None and not bool(torch.isfinite(loss))
                if self._any_rank(bad):
                    # a reward's NaN is the likely cause: named with its record, not only the micro-batch's records
                    groups = dict.fromkeys(b for b, _ in micro[k]) if bad else {}
                    causes = [roll.nonfinite[b] for b in groups if b in roll.nonfinite]
                    where = "; ".join(causes[:3]) if causes else f"records {ids[:8]}"
                    self._nonfinite(loss if bad else None, where, "GRPO loss")
                    opt.zero_grad(set_to_none=True)
                    # the batch's earlier updates have stepped: its remaining ones step without gradients (weights
                    # and moments unchanged), so the step count stays a multiple of updates_per_batch (max_steps
                    # and checkpoint intervals are checked against those); a first update skips the whole batch
                    for _ in range(self.updates_per_batch - update if update else 0):
                        opt.step()
                        scheduler.step()
                    return None
                if loss is None:
                    # fewer micro-batches than another rank: a zero gradient keeps the DDP ranks in step
                    self.manual_backward(self._no_op_loss())
                    continue
                self.manual_backward(loss)
                if update == 0:
                    stats["loss"] += float(loss_terms.detach().sum())
                    stats["kl"] += 0.0 if kl is None else float(kl.detach().sum())
                    stats["clipped"] += float(clipped.sum())
                    stats["tokens"] += float(logp.numel())
                elif update == self.updates_per_batch - 1:
                    stats["clipped_last"] = stats.get("clipped_last", 0.0) + float(clipped.sum())
            if max_micro:
                grad_norm = self._clip(opt)
            opt.step()
            scheduler.step()

        self._log_step(roll, zero, stats, grad_norm, stops, time.perf_counter() - t0)
        return torch.tensor(stats["loss"] / max(stats["tokens"], 1.0), dtype=torch.float32)

    @torch.no_grad()
    def _no_grad_logprobs(self, *args: Any) -> torch.Tensor:
        with eval_mode(self.model):
            return self.sequence_logprobs(self.model, *args)[0]

    def _clip(self, opt: Any) -> float | None:
        grads = [p.grad.detach().float().norm() for p in self.parameters() if p.grad is not None]
        if not grads:
            return None
        norm = float(torch.stack(grads).norm())
        if self.max_grad_norm is not None:
            self.clip_gradients(opt, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
        return norm

    def _log_step(
        self,
        roll: Rollouts,
        zero: torch.Tensor,
        stats: Mapping[str, float],
        grad_norm: float | None,
        stops: set[int],
        seconds: float,
    ) -> None:
        # Sums over every rank's rollouts (one all-reduce), so the metrics are the batch's, as the loss is, not
        # rank 0's share of it; by name, then the reward sums (`_reward_sums`: their total, the samples, ...)
        local = {
            "length": float(sum(len(t) for group in roll.completions for t in group)),
            "truncated": float(roll.truncated),
            "think_completions": float(roll.think_completions),
            "think_tokens": float(roll.think_tokens),
            "zero_groups": float(zero.sum()),
            "groups": float(zero.numel()),
            "loss": stats["loss"],
            "tokens": stats["tokens"],
            "kl": stats["kl"],
            "clipped": stats.get("clipped_last", stats["clipped"]),
            # the sum of each group's sample std, the one its advantages are divided by (a batch with a
            # non-finite reward stopped or was skipped before it is logged)
            "std": float(roll.rewards.double().std(dim=1).sum()) if len(roll.rewards) else 0.0,
        }
        values = [*local.values(), *self._reward_sums(roll)]
        total = self._all_reduce(torch.tensor(values, dtype=torch.float64), "sum").tolist()
        s = dict(zip(local, total))
        reward_sums = total[len(local) :]
        samples = reward_sums[1]  # every rank's completions
        tokens = s["tokens"]
        self.log("train/loss", s["loss"] / max(tokens, 1.0), prog_bar=True, batch_size=1)
        rewards = self._reward_means(reward_sums)
        self._say_all_tied(s["zero_groups"], s["groups"], rewards)
        if rewards:
            self.log("train/reward", rewards.pop(""), prog_bar=True, batch_size=1)
            for name, value in rewards.items():
                self.log(f"train/reward/{name}", value, batch_size=1)
            self.log("train/reward_std", s["std"] / max(s["groups"], 1.0), batch_size=1)
            completions = max(samples, 1.0)
            self.log("train/completion_length", s["length"] / completions, batch_size=1)
            self.log("train/truncated", s["truncated"] / completions, batch_size=1)
            if s["think_completions"]:
                self.log("train/think_length", s["think_tokens"] / s["think_completions"], batch_size=1)
            self.log("train/zero_variance_groups", s["zero_groups"] / max(s["groups"], 1.0), batch_size=1)
        if tokens:
            if self.beta > 0:
                self.log("train/kl", s["kl"] / tokens, batch_size=1)
            self.log("train/clip_fraction", s["clipped"] / tokens, batch_size=1)
        if grad_norm is not None:
            self.log("train/grad_norm", grad_norm, batch_size=1)
        # the logger's `step` counts batches; with updates_per_batch > 1 the optimizer's steps (what max_steps and
        # the checkpoints count) are this
        self.log("train/optimizer_step", float(self.global_step), batch_size=1)
        self._samples_per_s = samples / max(seconds, 1e-9)

    def _say_all_tied(self, tied: float, groups: float, rewards: Mapping[str, float]) -> None:
        """Warn once when `ALL_TIED_WARN_AFTER` batches in a row had every group tied: no step had a gradient, and
        the progress lines (loss 0, a steady reward) do not say that nothing trains. The usual cause is a reward
        at one value on every completion: the format reward of a model that never writes the think tags."""
        self._all_tied = self._all_tied + 1 if groups and tied == groups else 0
        if self._all_tied != ALL_TIED_WARN_AFTER or (
            self._trainer is not None and not self.trainer.is_global_zero
        ):
            return  # the counts are every rank's: said once, by rank 0
        means = ", ".join(f"{name} {value:.3f}" for name, value in rewards.items() if name)
        log.warning(
            "the last %d batches had every group tied (each prompt's %d completions rewarded alike): no gradient, "
            "the weights have not moved (mean rewards: %s). A reward at 0 or 1 on every completion ties every "
            "group: a format reward of 0 means the model never writes <think>..</think><answer>..</answer> (start "
            "GRPO from a think-SFT export); a higher model.rollout.temperature or group_size varies the completions",
            ALL_TIED_WARN_AFTER,
            self.group_size,
            means or "none",
        )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The gradient norm is logged by the step itself (before clipping)."""

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._samples_per_s is not None:
            self.log("train/samples_per_s", self._samples_per_s, prog_bar=True, batch_size=1)
        # the rate the step used (as the SFT module logs it), not the next step's: the schedule has stepped since
        for name, lr in self._step_lrs.items():
            self.log(f"lr/{name}", lr, batch_size=1)

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        if batch["input_ids"].shape[0] == 0:
            return
        prompts = self.batch_prompts(batch, "val")
        if not prompts:
            return
        features, mask = self._features(batch, prompts)
        params = self.rollout_params(sample=False)
        roll = self.score(prompts, self.generate(prompts, features, mask, 1, params, None))
        self._val_sums = [a + b for a, b in zip(self._val_sums, self._reward_sums(roll))]

    def on_validation_epoch_start(self) -> None:
        self._val_sums = [0.0] * (2 + 2 * len(self.rewards))

    def on_validation_epoch_end(self) -> None:
        """`val/reward` and `val/reward/<name>`: means over the whole validation set, every rank's share (each
        rank used to log the mean of its own share, and only rank 0's was written)."""
        total = self._all_reduce(torch.tensor(self._val_sums, dtype=torch.float64), "sum").tolist()
        rewards = self._reward_means(total)
        if rewards:  # the same keys and values on every rank
            self.log("val/reward", rewards.pop(""), prog_bar=True, batch_size=1, sync_dist=True)
            for name, value in rewards.items():
                self.log(f"val/reward/{name}", value, batch_size=1, sync_dist=True)

    # ------------------------------------------------------------------ reward statistics
    def _reward_sums(self, roll: Rollouts) -> list[float]:
        """[sum of the rewards, samples, then per reward (in `self.rewards` order) the sum of its values and the
        samples it applied to]: what `_reward_means` reads once summed over batches and ranks."""
        out = [float(roll.rewards.double().sum()), float(roll.rewards.numel())]
        for name in self.rewards:
            applied = [v for v in roll.components.get(name, []) if v is not None]
            out += [float(sum(applied)), float(len(applied))]
        return out

    def _reward_means(self, sums: Sequence[float]) -> dict[str, float]:
        """{"": the mean reward, name: each reward's mean over the samples it applied to} from `_reward_sums`
        totals; {} without samples, a reward left out where it applied to none."""
        if not sums[1]:
            return {}
        out = {"": sums[0] / sums[1]}
        for i, name in enumerate(self.rewards):
            value, count = sums[2 + 2 * i], sums[3 + 2 * i]
            if count:
                out[name] = value / count
        return out


# ---------------------------------------------------------------------------------------------- config checks
def _call_reward(name: str, reward: Any, output: ThinkOutput, prompt: Prompt) -> Any:
    """`reward(output, target)`; an exception it raises names the reward, the record and the completion (a reward of
    one's own failing on one record stopped the run with its bare traceback, the record unnamed)."""
    try:
        return reward(output, prompt.target)
    except (MemoryError, torch.OutOfMemoryError):
        raise  # the machine's, not the reward's
    except Exception as e:
        raise GRPOConfigError(
            f"model.rewards.{name} raised {type(e).__name__}: {e} for record {prompt.id!r} "
            f"({prompt.source or 'no source'}) on the completion {output.text!r:.80}"
        ) from e


def _reward_value(name: str, value: Any, prompt: Prompt) -> float | None:
    """A reward's value as a float (None: it does not apply); anything else is an error naming the reward and the
    record (a float() of it failed with a bare TypeError, the record unnamed)."""
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise GRPOConfigError(
            f"model.rewards.{name} returned {value!r:.80} for record {prompt.id!r} ({prompt.source or 'no source'}):"
            " expected a number, or None where it does not apply"
        ) from None


def _target(rec: Record) -> Target:
    """What the record's rewards compare against (its fields checked: errors name the record's file:line)."""
    reference = next((m.content for m in reversed(rec.messages) if m.role == "assistant"), None)
    if reference is None:
        raise ValueError(f"record {rec.id!r} ({rec.source}): no assistant turn to learn from")
    return Target.from_record(rec.extra, reference, rec.source)


def _same_value(a: Any, b: Any) -> bool:
    """Equal settings: numbers by value (1 and 1.0, a float's round trip), anything else by ==."""
    numbers = (int, float)
    if (
        isinstance(a, numbers)
        and isinstance(b, numbers)
        and not isinstance(a, bool)
        and not isinstance(b, bool)
    ):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def _override(value: Any) -> str:
    """A setting's value as a command-line override writes it (a mapping as Hydra's `{key:value,...}`)."""
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{_override(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override(v) for v in value) + "]"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


_UNCOMPARABLE = object()


def _plain_setting(value: Any) -> Any:
    """A reward attribute as a checkpoint can hold and a resume compare: numbers, strings, booleans and None as they
    are; lists, tuples and mappings of them (a config's ListConfig / DictConfig too) as lists and dicts; a named
    function or class as its `module.qualname`; anything else (an object, a lambda, a bound method, a partial)
    `_UNCOMPARABLE`."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        items = {str(k): _plain_setting(v) for k, v in value.items()}
        return _UNCOMPARABLE if any(v is _UNCOMPARABLE for v in items.values()) else items
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):  # a ListConfig too
        items = [_plain_setting(v) for v in value]
        return _UNCOMPARABLE if any(v is _UNCOMPARABLE for v in items) else items
    if isinstance(value, functools.partial):  # Hydra's `_partial_: true`
        parts = {"_target_": _plain_setting(value.func)}
        if value.args:
            parts["_args_"] = _plain_setting(value.args)
        parts.update({str(k): _plain_setting(v) for k, v in value.keywords.items()})
        return _UNCOMPARABLE if any(v is _UNCOMPARABLE for v in parts.values()) else parts
    named = (
        isinstance(value, type)
        or inspect.isfunction(value)
        or inspect.isbuiltin(value)
        or inspect.ismethoddescriptor(value)
    )
    name = getattr(value, "__qualname__", None)
    module = getattr(value, "__module__", None) or getattr(
        getattr(value, "__objclass__", None), "__module__", None
    )
    # not a lambda or a function made inside another (two of them share a name)
    if named and isinstance(name, str) and isinstance(module, str) and "<" not in name:
        return f"{module}.{name}"
    return _UNCOMPARABLE


def _reward_attributes(reward: Any) -> list[tuple[str, Any]]:
    """A reward's public attributes but its weight, by name."""
    items = sorted(vars(reward).items()) if hasattr(reward, "__dict__") else []
    return [(k, v) for k, v in items if not k.startswith("_") and k != "weight"]


def _reward_settings(reward: Any, scalars_only: bool = False) -> dict[str, Any]:
    """A reward as saved in checkpoints: `{_target_: its class, weight, its other settings}` (`_plain_setting`:
    what a config sets; attributes that cannot be compared are left out and named by `_unchecked_rewards`).
    `scalars_only`: numbers, strings, booleans and None alone, what checkpoints saved before `REWARD_SETTINGS_V2`."""
    cls = type(reward)
    out: dict[str, Any] = {"_target_": f"{cls.__module__}.{cls.__qualname__}", "weight": reward.weight}
    for key, value in _reward_attributes(reward):
        if scalars_only and not (value is None or isinstance(value, (bool, int, float, str))):
            continue
        plain = _plain_setting(value)
        if plain is not _UNCOMPARABLE:
            out[key] = plain
    return out


def _unchecked_rewards(rewards: Mapping[str, Any]) -> list[str]:
    """`model.rewards.<name>.<attribute> (its type)` of each attribute a resume cannot compare (`_plain_setting`)."""
    return [
        f"model.rewards.{name}.{key} ({type(value).__name__})"
        for name, reward in rewards.items()
        for key, value in _reward_attributes(reward)
        if _plain_setting(value) is _UNCOMPARABLE
    ]


def _reward_changes(then: Mapping[str, Any], now: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """`model.rewards` then and now (`_reward_settings` by name) -> {setting: (then, now)}: a reward added or left
    out as the whole entry (null on the side without it), another class as the entry, else each setting."""
    out: dict[str, tuple[Any, Any]] = {}
    for name in [*then, *(n for n in now if n not in then)]:
        a, b = then.get(name), now.get(name)
        if not isinstance(a, Mapping) or not isinstance(b, Mapping) or a.get("_target_") != b.get("_target_"):
            if a != b:
                out[f"model.rewards.{name}"] = (a, b)
            continue
        for key in [*a, *(k for k in b if k not in a)]:
            if key in a and key in b and _same_value(a[key], b[key]):
                continue
            out[f"model.rewards.{name}.{key}"] = (a.get(key), b.get(key))
    return out


def _check_keys(where: str, values: Mapping[str, Any], expected: tuple[str, ...]) -> None:
    unknown = sorted(set(values) - set(expected))
    missing = [k for k in expected if k not in values]
    if unknown or missing:
        raise GRPOConfigError(
            f"{where}: unknown key(s) {unknown}, missing key(s) {missing}; expected exactly {list(expected)}"
        )


def _adapters_start_trained(net: MusicFlamingo) -> bool:
    """Whether some LoRA adapter adds something already (a fresh one's B is zero)."""
    return any(bool(layer.lora_B.detach().any()) for layer in adapter_layers(net))


def _dropouts(net: MusicFlamingo) -> list[str]:
    """The model's dropout probabilities above zero, as `name=value` (its config's, the encoder's layerdrop and the
    LoRA adapters')."""
    audio, text = net.config.audio, net.config.text
    # layerdrop too: in training mode it skips encoder layers at random (a frozen tower as well), so the policy's
    # pass read other audio features than the rollouts, `old` and the reference (all in eval mode) did
    found = [
        f"audio.{n}={getattr(audio, n)}"
        for n in ("dropout", "attention_dropout", "activation_dropout", "layerdrop")
        if getattr(audio, n) > 0
    ]
    if text.attention_dropout > 0:
        found.append(f"text.attention_dropout={text.attention_dropout}")
    lora = {m.p for m in net.modules() if isinstance(m, nn.Dropout) and m.p > 0}
    found += [f"lora.dropout={p}" for p in sorted(lora)]
    return found


def _int(where: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise GRPOConfigError(f"{where}={value!r}: expected an integer >= {minimum}")
    return value


def _number(where: str, value: Any, minimum: float, strict: bool = False) -> float:
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    if bad or value < minimum or (strict and value == minimum):
        raise GRPOConfigError(f"{where}={value!r}: expected a number {'>' if strict else '>='} {minimum}")
    return float(value)
