"""Build the synthetic music corpus: plan clips, render them, write audio, MIDI, JSONL manifests and corpus.json.

Layout of ``out_dir``::

    corpus.json               config, config hash, counts, chance level per question type (written last)
    train.jsonl val.jsonl test.jsonl             one record per caption / question (what eval.py scores)
    train_chat.jsonl val_chat.jsonl test_chat.jsonl  for training: per clip, its questions as one multi-turn conversation
    train_captions.jsonl ...                         for training: per clip, its caption as a conversation of its own
    audio/<split>-<nnnnn>.wav 16-bit PCM mono
    midi/<split>-<nnnnn>.mid  the same clip as a standard MIDI file (tempo, metre, key, program)

Splits never share a source piece: each generated progression is its own piece, and each chorale goes to one
split only. Every random choice comes from ``np.random.default_rng([seed, split, index, ...])``, and batches of
clips are formed independently of the number of workers, so one seed gives the same bytes every time.
A finished folder is reused when its config hash matches; a different config raises
:class:`CorpusConfigError` unless ``overwrite=True``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from musicflamingo.data.synthetic.render import (
    DEFAULT_SOUNDFONT,
    Performance,
    check_soundfont,
    find_fluidsynth,
    render_batch,
    write_clip_midi,
)
from musicflamingo.data.synthetic.sources import (
    Chorale,
    chorale_excerpt,
    chorale_paths,
    generate_progression_piece,
    load_chorale,
)
from musicflamingo.data.synthetic.text import NUM_OPTIONS, QUESTION_TYPES, chat_record, clip_records
from musicflamingo.data.synthetic.theory import (
    FAMILY_TRANSPOSE,
    INSTRUMENT_LABELS,
    INSTRUMENTS,
    MODES,
    TEMPO_BUCKETS,
    TIME_SIGNATURES,
    Key,
    program_family,
)

# Bump when a change to the code changes the output for the same config (an old corpus folder is then refused,
# not reused). 7: key distractors away from the parallel key too.
GENERATOR_VERSION = 7
SPLITS = ("train", "val", "test")
_BATCH_CLIPS = 24  # clips per fluidsynth call; fixed so that the output does not depend on the worker count


class CorpusConfigError(ValueError):
    """The output folder holds something other than the corpus this config asks for."""


@dataclass(frozen=True)
class CorpusConfig:
    seed: int = 0
    n_train: int = 400
    n_val: int = 50
    n_test: int = 50
    clip_seconds: tuple[float, float] = (4.0, 15.0)
    sampling_rate: int = 16000
    render_rate: int = 32000
    chorale_fraction: float = 0.25
    clips_per_chorale: int = 4
    soundfont: str = DEFAULT_SOUNDFONT
    # chorales (`bach/bwv399`) another corpus uses: a corpus built to test generalisation takes other pieces
    exclude_sources: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("n_train", "n_val", "n_test"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        lo, hi = self.clip_seconds
        if not 1.0 <= lo <= hi:
            raise ValueError(f"clip_seconds must be (min, max) with 1 <= min <= max, got {self.clip_seconds}")
        if not 0.0 <= self.chorale_fraction <= 1.0:
            raise ValueError(f"chorale_fraction must be in [0, 1], got {self.chorale_fraction}")
        if self.sampling_rate <= 0 or self.render_rate <= 0:
            raise ValueError(f"sampling rates must be > 0, got {self.sampling_rate} and {self.render_rate}")
        if self.clips_per_chorale < 1:
            raise ValueError(f"clips_per_chorale must be >= 1, got {self.clips_per_chorale}")

    def sizes(self) -> dict[str, int]:
        return {"train": self.n_train, "val": self.n_val, "test": self.n_test}

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["clip_seconds"] = [float(x) for x in self.clip_seconds]
        if self.exclude_sources:
            d["exclude_sources"] = sorted(self.exclude_sources)
        else:  # absent when empty, as in corpora built before the field
            del d["exclude_sources"]
        return d

    def digest(self) -> str:
        payload = json.dumps({"version": GENERATOR_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class CorpusInfo:
    """Where a built corpus lives. ``manifests[split]`` is the JSONL path of that split."""

    root: Path
    train: Path
    val: Path
    test: Path
    corpus_json: Path

    @classmethod
    def from_dir(cls, root: str | Path) -> CorpusInfo:
        root = Path(root)
        return cls(root, root / "train.jsonl", root / "val.jsonl", root / "test.jsonl", root / "corpus.json")

    @property
    def manifests(self) -> dict[str, Path]:
        return {"train": self.train, "val": self.val, "test": self.test}

    def chat(self, split: str) -> Path:
        """``<split>_chat.jsonl``: per clip, its questions as one multi-turn conversation."""
        return self.root / f"{split}_chat.jsonl"

    def captions(self, split: str) -> Path:
        """``<split>_captions.jsonl``: per clip, its caption as a conversation of its own."""
        return self.root / f"{split}_captions.jsonl"

    def metadata(self) -> dict[str, Any]:
        return json.loads(self.corpus_json.read_text())


@dataclass
class _Clip:
    clip_id: str
    split: str
    perf: Performance
    time_signature: str
    key: Key
    meta: dict[str, Any]


def _select_chorales(cfg: CorpusConfig, counts: dict[str, int]) -> dict[str, list[Chorale]]:
    """Disjoint chorales per split, taken in a seeded order from music21's corpus."""
    need = {s: math.ceil(n / cfg.clips_per_chorale) for s, n in counts.items()}
    total = sum(need.values())
    chosen: list[Chorale] = []
    if total:
        paths = chorale_paths()
        order = np.random.default_rng([cfg.seed, 7919]).permutation(len(paths))
        seen: set[str] = set()
        for i in order:
            ch = load_chorale(paths[int(i)])
            base = ch.source_id.split("-")[0] if ch else None  # bwv112.5 and bwv112.5-sc are one piece
            if ch is not None and base not in seen and base not in cfg.exclude_sources:
                seen.add(base)
                chosen.append(ch)
                if len(chosen) == total:
                    break
        if len(chosen) < total:
            raise ValueError(
                f"music21's corpus has only {len(chosen)} usable chorales, {total} needed "
                f"({counts} chorale clips at clips_per_chorale={cfg.clips_per_chorale}): "
                "lower chorale_fraction or raise clips_per_chorale"
            )
    out, start = {}, 0
    for s in SPLITS:
        out[s] = chosen[start : start + need[s]]
        start += need[s]
    return out


def _balanced(values: list, n: int, rng: np.random.Generator) -> list:
    """``n`` values, each of ``values`` used equally often (+-1), in random order: no answer is more common
    than another, so a model cannot beat chance by always giving the majority answer."""
    offset = int(rng.integers(len(values)))
    out = [values[(offset + i) % len(values)] for i in range(n)]
    return [out[int(i)] for i in rng.permutation(n)]


def _topped_up(values: list, fixed: list, n: int, rng: np.random.Generator) -> list:
    """``n`` more values chosen so that, together with ``fixed`` ones (e.g. the metres of chorale clips,
    which are 3/4 or 4/4), every value is as equally frequent as possible; random order."""
    counts = {v: fixed.count(v) for v in values}
    order = [values[int(i)] for i in rng.permutation(len(values))]  # random tie-break
    out = []
    for _ in range(n):
        v = min(order, key=lambda x: counts[x])
        counts[v] += 1
        out.append(v)
    return [out[int(i)] for i in rng.permutation(n)]


def _plan_split(cfg: CorpusConfig, split: str, chorales: list[Chorale]) -> list[_Clip]:
    si = SPLITS.index(split)
    n = cfg.sizes()[split]
    n_chorale = round(n * cfg.chorale_fraction)
    split_rng = np.random.default_rng([cfg.seed, si, 1])
    kinds = ["chorale"] * n_chorale + ["generated"] * (n - n_chorale)
    kinds = [kinds[int(i)] for i in split_rng.permutation(n)]
    chorale_of = [chorales[j // cfg.clips_per_chorale] for j in range(n_chorale)]
    tempos = _balanced(list(TEMPO_BUCKETS), n, split_rng)
    programs = _balanced(list(INSTRUMENTS), n, split_rng)
    n_gen = n - n_chorale
    metres = _topped_up(list(TIME_SIGNATURES), [c.time_signature for c in chorale_of], n_gen, split_rng)
    modes = _topped_up(list(MODES), [c.key.mode for c in chorale_of], n_gen, split_rng)
    clips, chorale_uses, gen_uses = [], 0, 0
    for i, kind in enumerate(kinds):
        rng = np.random.default_rng([cfg.seed, si, 2, i])
        clip_id = f"{split}-{i:05d}"
        duration = round(float(rng.uniform(*cfg.clip_seconds)), 1)
        bpm, program = tempos[i], programs[i]
        family = program_family(program)
        n_beats = duration * bpm / 60.0
        meta: dict[str, Any] = {}
        if kind == "chorale":
            chorale = chorale_of[chorale_uses]
            chorale_uses += 1
            key = Key(int(rng.integers(12)), chorale.key.mode)
            time_signature = chorale.time_signature
            notes, shift = chorale_excerpt(chorale, key, n_beats, rng)
            source, title = chorale.source_id.split("-")[0], chorale.title
            meta.update(source_title=title, original_key=chorale.key.name, transpose=shift)
        else:
            key = Key(int(rng.integers(12)), modes[gen_uses])
            time_signature = metres[gen_uses]
            gen_uses += 1
            notes, progression = generate_progression_piece(key, time_signature, n_beats, rng)
            source = f"generated/{split}-{i:05d}"
            meta.update(progression=progression)
        shift = FAMILY_TRANSPOSE.get(family, 0)
        if shift:
            notes = [dataclasses.replace(nt, pitch=nt.pitch + shift) for nt in notes]
        meta = {
            "key": key.name,
            "tonic": key.tonic,
            "tonic_pc": key.tonic_pc,
            "mode": key.mode,
            "tempo_bpm": bpm,
            "time_signature": time_signature,
            "program": program,
            "instrument": INSTRUMENTS[program],
            "instrument_label": INSTRUMENT_LABELS[program],
            "instrument_family": family,
            "source": source,
            "source_kind": kind,
            "duration": duration,
            "split": split,
            **meta,
        }
        perf = Performance(tuple(notes), float(bpm), program, duration)
        clips.append(_Clip(clip_id, split, perf, time_signature, key, meta))
    return clips


def _majority_rates(metas: list[dict[str, Any]]) -> dict[str, float]:
    fields = {"key": "key", "tempo": "tempo_bpm", "time_signature": "time_signature"}
    fields["instrument_family"] = "instrument_family"
    out = {}
    for qt in QUESTION_TYPES:
        values = [m[fields[qt]] for m in metas]
        out[qt] = round(max(values.count(v) for v in set(values)) / len(values), 4) if values else 0.0
    return out


def _check_existing(out_dir: Path, cfg: CorpusConfig, overwrite: bool) -> CorpusInfo | None:
    info = CorpusInfo.from_dir(out_dir)
    if info.corpus_json.is_file():
        try:
            old = info.metadata()
        except json.JSONDecodeError as e:
            raise CorpusConfigError(f"{info.corpus_json}: not valid JSON ({e}); delete the folder") from e
        complete = all(
            p.is_file()
            for p in [*info.manifests.values(), *map(info.chat, SPLITS), *map(info.captions, SPLITS)]
        )
        if old.get("config_hash") == cfg.digest() and complete:
            return info
        if not overwrite:
            diff = {
                k: (old.get("config", {}).get(k), v)
                for k, v in cfg.to_dict().items()
                if old.get("config", {}).get(k) != v
            }
            raise CorpusConfigError(
                f"{out_dir} holds a synthetic corpus built with another config (old, new: {diff or 'version'}); "
                "pass another output folder or overwrite=True (--overwrite)"
            )
        shutil.rmtree(out_dir)
    elif out_dir.exists() and any(out_dir.iterdir()):
        raise CorpusConfigError(f"{out_dir} is not empty and has no corpus.json: refusing to write into it")
    return None


def build_corpus(
    out_dir: str | Path,
    *,
    seed: int = 0,
    n_train: int = 400,
    n_val: int = 50,
    n_test: int = 50,
    clip_seconds: tuple[float, float] = (4.0, 15.0),
    sampling_rate: int = 16000,
    render_rate: int = 32000,
    chorale_fraction: float = 0.25,
    clips_per_chorale: int = 4,
    soundfont: str | Path = DEFAULT_SOUNDFONT,
    exclude_sources: Sequence[str] = (),
    workers: int = 2,
    overwrite: bool = False,
    progress: bool = True,
) -> CorpusInfo:
    """Build (or reuse) the corpus in ``out_dir`` and return its paths.

    Args:
        n_train, n_val, n_test: clips per split; each clip gives 1 caption and 4 MCQ records.
        clip_seconds: (min, max) clip length, drawn uniformly per clip.
        render_rate: FluidSynth's sample rate before resampling to ``sampling_rate``.
        chorale_fraction: share of clips cut from Bach chorales (the rest are generated progressions).
        clips_per_chorale: clips cut from each chorale (different key, tempo, instrument, length).
        exclude_sources: chorales not to use (`bach/bwv399`, as a clip's `meta.source`): those of another corpus.
        workers: concurrent fluidsynth processes; does not change the output.
    """
    cfg = CorpusConfig(
        seed=seed,
        n_train=n_train,
        n_val=n_val,
        n_test=n_test,
        clip_seconds=(float(clip_seconds[0]), float(clip_seconds[1])),
        sampling_rate=sampling_rate,
        render_rate=render_rate,
        chorale_fraction=chorale_fraction,
        clips_per_chorale=clips_per_chorale,
        soundfont=str(soundfont),
        exclude_sources=tuple(sorted(set(exclude_sources))),
    )
    out_dir = Path(out_dir)
    found = _check_existing(out_dir, cfg, overwrite)
    if found is not None:
        return found
    find_fluidsynth()
    check_soundfont(cfg.soundfont)
    t0 = time.perf_counter()
    counts = {s: round(n * cfg.chorale_fraction) for s, n in cfg.sizes().items()}
    chorales = _select_chorales(cfg, counts)
    plan = {s: _plan_split(cfg, s, chorales[s]) for s in SPLITS}
    clips = [c for s in SPLITS for c in plan[s]]

    tmp = out_dir.parent / f".{out_dir.name}.partial-{cfg.digest()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "audio").mkdir(parents=True)
    (tmp / "midi").mkdir()
    batches = [clips[i : i + _BATCH_CLIPS] for i in range(0, len(clips), _BATCH_CLIPS)]
    try:
        _render_all(batches, tmp, cfg, workers, progress)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written corpus behind
        raise

    summary: dict[str, Any] = {}
    for s in SPLITS:
        records, chats, captions = [], [], []
        # The correct letter is balanced over A-D within each split and question type.
        letter_rng = np.random.default_rng([cfg.seed, SPLITS.index(s), 4])
        positions = {
            qt: _balanced(list(range(NUM_OPTIONS)), len(plan[s]), letter_rng) for qt in QUESTION_TYPES
        }
        for j, c in enumerate(plan[s]):
            rng = np.random.default_rng([cfg.seed, SPLITS.index(s), 3, j])
            pos = {qt: positions[qt][j] for qt in QUESTION_TYPES}
            clip = clip_records(c.clip_id, f"audio/{c.clip_id}.wav", c.meta, rng, pos)
            records += clip
            chats.append(
                chat_record(c.clip_id, clip, np.random.default_rng([cfg.seed, SPLITS.index(s), 5, j]))
            )
            # The caption is its own conversation: inside the questions' one, its facts could be copied from
            # the answers before it (or the answers from it) instead of heard (see `chat_record`).
            captions += [r for r in clip if r["task"] == "caption"]
        for name, rows in (
            (f"{s}.jsonl", records),
            (f"{s}_chat.jsonl", chats),
            (f"{s}_captions.jsonl", captions),
        ):
            with open(tmp / name, "w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r, ensure_ascii=False, sort_keys=False) + "\n")
        summary[s] = {
            "manifest": f"{s}.jsonl",
            "chat_manifest": f"{s}_chat.jsonl",
            "caption_manifest": f"{s}_captions.jsonl",
            "clips": len(plan[s]),
            "records": len(records),
            "sources": len({c.meta["source"] for c in plan[s]}),
            "chorale_clips": sum(c.meta["source_kind"] == "chorale" for c in plan[s]),
            "audio_seconds": round(sum(c.perf.duration for c in plan[s]), 1),
            # Accuracy of always giving the most common answer (chance is 1/num_options).
            "majority_answer_rate": _majority_rates([c.meta for c in plan[s]]),
        }
    meta = {
        "name": "musicflamingo-synthetic",
        "generator_version": GENERATOR_VERSION,
        "config_hash": cfg.digest(),
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "splits": summary,
        "tasks": ["caption", "mcq"],
        "question_types": list(QUESTION_TYPES),
        "num_options": NUM_OPTIONS,
        "chance": {qt: 1.0 / NUM_OPTIONS for qt in QUESTION_TYPES},
        "answer_sets": {"tempo_bpm": list(TEMPO_BUCKETS), "time_signature": list(TIME_SIGNATURES)},
    }
    (tmp / "corpus.json").write_text(json.dumps(meta, indent=2) + "\n")
    if out_dir.exists():
        out_dir.rmdir()  # checked empty above
    tmp.rename(out_dir)
    elapsed = time.perf_counter() - t0
    if progress:
        print(
            f"synthetic corpus: {len(clips)} clips in {elapsed:.1f} s ({len(clips) / elapsed:.1f} clips/s) -> {out_dir}"
        )
    return CorpusInfo.from_dir(out_dir)


def _render_all(
    batches: list[list[_Clip]], tmp: Path, cfg: CorpusConfig, workers: int, progress: bool
) -> None:
    import soundfile as sf
    from tqdm.auto import tqdm

    def job(bi: int) -> int:
        batch = batches[bi]
        audio = render_batch(
            [c.perf for c in batch],
            tmp / f"work{bi}",
            soundfont=cfg.soundfont,
            sampling_rate=cfg.sampling_rate,
            render_rate=cfg.render_rate,
        )
        (tmp / f"work{bi}").rmdir()
        for c, wav in zip(batch, audio):
            sf.write(str(tmp / "audio" / f"{c.clip_id}.wav"), wav, cfg.sampling_rate, subtype="PCM_16")
            write_clip_midi(tmp / "midi" / f"{c.clip_id}.mid", c.perf, c.time_signature, c.key)
        return len(batch)

    total = sum(len(b) for b in batches)
    with tqdm(
        total=total, desc="rendering clips", unit="clip", disable=not progress or not sys.stderr.isatty()
    ) as bar:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for n in pool.map(job, range(len(batches))):
                bar.update(n)


def corpus_texts(info: CorpusInfo, splits: tuple[str, ...] = SPLITS) -> list[str]:
    """Every text of the corpus (prompts without ``<sound>``, captions, questions, answers) for training a
    tokenizer. Pass ``splits=("train",)`` to keep val/test text out of the vocabulary."""
    texts = []
    for s in splits:
        with open(info.manifests[s], encoding="utf-8") as f:
            for line in f:
                for turn in json.loads(line)["conversations"]:
                    texts.append(turn["content"].replace("<sound>", ""))
    return texts
