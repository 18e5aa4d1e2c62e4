"""Data loader throughput: samples/s and audio-hours/s that training's loader delivers on N workers, from local
files, from litdata shards and from WebDataset tars, next to the `small` training step
(configs/experiment/synthetic_small.yaml).

    python bench/data_loader.py [--clips 2000] [--workers 2] [--samples 400] [--dir /tmp/mf_loader_bench] [--no-step]

The corpus is made here: ``--clips`` FLAC clips of 4-15 s (tones and noise, 16 kHz; the synthetic corpus' range),
each with a four-question conversation, and a SentencePiece processor with 6 s windows (as the main job). Each
row times ``--samples`` samples after the first batch (worker start-up excluded), in training's random order,
through the loader training uses: token-budget batches (``batch_max_tokens`` 3400) -> dataset (decode, log-mel,
tokens) -> collate. WebDataset has no random access, so its row streams the tars in order and batches 8 samples at
a time. "read only" rows time the storage alone (bytes, no decoding) over every sample. The step row times `small`
(bf16 autocast, AdamW) on a batch of the corpus; "keeps up" is loader batches/s x step seconds (>= 1: the loader
is not the bottleneck). Results and the choice they led to: docs/performance.md "Data: shards and loader
throughput".
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from musicflamingo.audio.io import load_audio  # noqa: E402
from musicflamingo.data.collate import collate  # noqa: E402
from musicflamingo.data.dataset import ConversationDataset  # noqa: E402
from musicflamingo.data.manifest import AudioRef, Message, Record, read_manifest  # noqa: E402
from musicflamingo.data.sampler import TokenBudgetBatchSampler  # noqa: E402
from musicflamingo.data.shards import ShardDataset, write_shards  # noqa: E402

BUDGET = 3400  # data.batch_max_tokens of synthetic_small
WORDS = "tempo key major minor piano strings bright dark slow fast waltz march calm loud soft bass high low".split()


# ---------------------------------------------------------------------------------------------- corpus
def make_corpus(root: Path, n: int, seed: int = 0) -> tuple[Path, dict[str, float]]:
    """n FLAC clips + train.jsonl; returns the manifest and each record's seconds."""
    import soundfile as sf

    manifest = root / "train.jsonl"
    seconds = {}
    lines = []
    for i in range(n):
        # per clip, audio and text apart: a rerun that reuses the audio files writes the same manifest
        rng, text = np.random.default_rng([seed, i, 0]), np.random.default_rng([seed, i, 1])
        s = float(rng.uniform(4.0, 15.0))
        seconds[f"r{i}"] = s
        path = root / "audio" / f"{i:05d}.flac"
        if not path.exists():
            t = np.arange(int(s * 16000)) / 16000
            x = 0.3 * np.sin(2 * np.pi * rng.uniform(80, 2000) * t) + 0.05 * rng.standard_normal(t.shape)
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, x.astype(np.float32), 16000, subtype="PCM_16")
        conv = []
        for q in range(4):
            question = " ".join(text.choice(WORDS, size=int(text.integers(4, 12))))
            answer = " ".join(text.choice(WORDS, size=int(text.integers(3, 20))))
            conv.append(
                {"role": "user", "content": ("<sound>" if q == 0 else "") + f"Question {q}: {question}?"}
            )
            conv.append({"role": "assistant", "content": answer})
        lines.append(json.dumps({"id": f"r{i}", "audio": f"audio/{i:05d}.flac", "conversations": conv}))
    manifest.write_text("\n".join(lines) + "\n")
    return manifest, seconds


def make_processor(root: Path, manifest: Path) -> Any:
    from musicflamingo.processor import MusicFlamingoProcessor
    from musicflamingo.tokenizer import load_tokenizer, train_sentencepiece

    out = root / "processor"
    if not (out / "processor_config.json").is_file():
        texts = [m.content for r in read_manifest(manifest) for m in r.messages]
        train_sentencepiece(texts, 1024, out)
        MusicFlamingoProcessor(load_tokenizer(out), chunk_length=6.0, max_audio_len=60.0).save_pretrained(out)
    return MusicFlamingoProcessor.from_pretrained(out)


def write_tars(manifest: Path, out: Path, shards: int) -> list[str]:
    """WebDataset layout: per sample <key>.flac (the file's bytes) and <key>.json (the manifest line)."""
    out.mkdir(parents=True, exist_ok=True)
    records = read_manifest(manifest)
    urls = []
    for k in range(shards):
        url = out / f"shard-{k:04d}.tar"
        urls.append(str(url))
        if url.exists():
            continue
        with tarfile.open(url, "w") as tar:
            for i in range(k, len(records), shards):
                r = records[i]
                meta = {
                    "id": r.id,
                    "conversations": [{"role": m.role, "content": m.content} for m in r.messages],
                }
                for name, data in ((f"{i:07d}.flac", Path(r.audios[0].path).read_bytes()),
                                   (f"{i:07d}.json", json.dumps(meta).encode())):  # fmt: skip
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return urls


# ---------------------------------------------------------------------------------------------- loaders
class BytesBuilder(ConversationDataset):
    """Builds a sample from a WebDataset sample (the record's JSON and the audio file's bytes)."""

    def build(self, sample: dict[str, Any]) -> dict[str, Any]:
        meta = json.loads(sample["json"])
        self._blob = sample["flac"]
        messages = [Message(**m) for m in meta["conversations"]]
        return self._build(Record(id=meta["id"], audios=[AudioRef(sample["__key__"])], messages=messages))

    def _decode(self, ref: AudioRef, source: str | None = None) -> np.ndarray:
        p = self.processor
        return load_audio(
            ref.path, p.sampling_rate, max_seconds=p.kept_seconds, data=self._blob, source=source
        )


class ReadOnly(Dataset):
    """Storage alone: the bytes of sample i (files, or a shard set), not decoded."""

    def __init__(self, paths: list[str], shards: str | None = None) -> None:
        self.paths, self.shards, self.ds = paths, shards, None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> int:
        if self.shards is None:
            with open(self.paths[i], "rb") as f:
                return len(f.read())
        if self.ds is None:  # opened in the worker
            from litdata import StreamingDataset

            self.ds = StreamingDataset(self.shards)
        return len(self.ds[i])


def timed(loader: Any, seconds: dict[str, float] | None, limit: int) -> dict[str, float]:
    """`loader` after its first batch, until `limit` samples: samples/s, audio-hours/s, batches/s, tokens/s."""
    it = iter(loader)
    next(it)  # worker start-up and the first batch: not throughput
    t0 = time.perf_counter()
    samples = batches = tokens = 0
    audio = 0.0
    for batch in it:
        if samples >= limit:
            break
        batches += 1
        if isinstance(batch, dict):
            samples += len(batch["ids"])
            tokens += batch["input_ids"].numel()
            audio += sum(seconds[i] for i in batch["ids"]) if seconds else 0.0
        else:
            samples += len(batch)
    dt = time.perf_counter() - t0
    return {
        "samples_s": samples / dt,
        "audio_h_s": audio / 3600 / dt,
        "batches_s": batches / dt,
        "tokens_s": tokens / dt,
        "seconds": dt,
    }


def budget_loader(dataset: Dataset, lengths: list[int], workers: int, pad_id: int) -> DataLoader:
    sampler = TokenBudgetBatchSampler(lengths, BUDGET, seed=0)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=partial(collate, pad_token_id=pad_id),
        prefetch_factor=2 if workers else None,
    )


def wds_loader(urls: list[str], builder: BytesBuilder, workers: int, pad_id: int) -> DataLoader:
    import webdataset as wds

    pipeline = (
        wds.WebDataset(
            urls, shardshuffle=False, nodesplitter=None, workersplitter=wds.split_by_worker, empty_check=False
        )
        .map(builder.build)
        .batched(8, collation_fn=partial(collate, pad_token_id=pad_id), partial=True)
    )
    return DataLoader(pipeline, batch_size=None, num_workers=workers, prefetch_factor=2 if workers else None)


def read_only_loader(dataset: Dataset, order: list[int], workers: int) -> DataLoader:
    batches = [order[i : i + 8] for i in range(0, len(order), 8)]
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=list)


# ---------------------------------------------------------------------------------------------- training step
def step_seconds(processor: Any, batch: dict[str, Any], steps: int = 4) -> float:
    """Seconds per `small` training step (synthetic_small's 6 s windows, bf16 autocast, AdamW) on `batch`."""
    from musicflamingo import MusicFlamingo, MusicFlamingoConfig

    tok = processor.tokenizer
    cfg = MusicFlamingoConfig.from_name(
        "small",
        audio={"max_source_positions": 300},
        text={
            "vocab_size": len(tok),  # every id: tok.vocab_size leaves added tokens out
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        },
        audio_token_id=processor.audio_token_id,
        audio_bos_token_id=processor.audio_bos_token_id,
        audio_eos_token_id=processor.audio_eos_token_id,
    )
    torch.manual_seed(0)
    model = MusicFlamingo(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    keys = ("input_ids", "attention_mask", "input_features", "input_features_mask", "labels")
    inputs = {k: batch[k] for k in keys}
    times = []
    for _ in range(steps + 1):  # the first is warm-up
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**inputs, return_logits=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--samples", type=int, default=300, help="samples timed per decoding row (read-only: all)"
    )
    ap.add_argument(
        "--repeats", type=int, default=3, help="rounds over all rows (interleaved); medians shown"
    )
    ap.add_argument(
        "--dir", default="/tmp/mf_loader_bench", help="corpus, shards and tars (reused when present)"
    )
    ap.add_argument("--no-step", action="store_true", help="skip timing the training step")
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args(argv)
    root = Path(a.dir) / f"n{a.clips}"
    root.mkdir(parents=True, exist_ok=True)

    t = time.perf_counter()
    manifest, seconds = make_corpus(root, a.clips)
    processor = make_processor(root, manifest)
    hours = sum(seconds.values()) / 3600
    print(f"corpus: {a.clips} clips, {hours:.2f} h of audio ({time.perf_counter() - t:.0f} s)")
    shards = root / "shards"
    if not (shards / "index.json").is_file():
        t = time.perf_counter()
        write_shards(manifest, str(shards), workers=a.workers)
        print(f"litdata shards written in {time.perf_counter() - t:.1f} s ({a.workers} workers)")
    urls = write_tars(manifest, root / "tars", shards=8)

    records = read_manifest(manifest)
    files = ConversationDataset(records, processor)
    local = ShardDataset(shards, processor)
    t = time.perf_counter()
    lengths = files.estimate_lengths()
    t_files, t = time.perf_counter() - t, time.perf_counter()
    assert local.estimate_lengths() == lengths
    print(
        f"lengths at setup: files {t_files:.2f} s (headers), shards {time.perf_counter() - t:.2f} s (stored)"
    )

    pad, w = processor.pad_token_id, a.workers
    # training's random order (token-budget batches of epoch 0), for the read-only rows
    order = [i for b in TokenBudgetBatchSampler(lengths, BUDGET, seed=0) for i in b]
    paths = [r.audios[0].path for r in records]
    runs = [
        ("files", lambda: budget_loader(files, lengths, w, pad), seconds),
        ("litdata shards, local", lambda: budget_loader(local, lengths, w, pad), seconds),
        ("webdataset tars, in order", lambda: wds_loader(urls, BytesBuilder([], processor), w, pad), seconds),
        ("read only: files", lambda: read_only_loader(ReadOnly(paths), order, w), None),
        ("read only: litdata, random", lambda: read_only_loader(ReadOnly(paths, str(shards)), order, w), None),
        ("read only: litdata, in order", lambda: read_only_loader(ReadOnly(paths, str(shards)), sorted(order), w), None),
    ]  # fmt: skip
    trials: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in runs}
    for k in range(a.repeats):  # rounds over all rows, so that load from other processes hits every row alike
        for name, make, secs in runs:
            trials[name].append(r := timed(make(), secs, a.samples if secs else len(order)))
            print(f"  [{k}] {name:30s} {r['samples_s']:9.1f} samples/s {r['audio_h_s']:6.3f} audio-h/s")
    rows = {
        name: {key: float(np.median([t[key] for t in ts])) for key in ts[0]} for name, ts in trials.items()
    }

    step = None
    if not a.no_step:
        batch = next(iter(budget_loader(files, lengths, 0, pad)))
        step = step_seconds(processor, batch)
        print(f"`small` training step: {step:.2f} s at {batch['input_ids'].numel()} padded tokens")

    print(
        f"\n| loader ({w} workers, median of {a.repeats}) | samples/s | audio-h/s | batches/s | keeps up with the step |"
    )
    print("|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        keeps = f"{r['batches_s'] * step:.1f}x" if step and r["audio_h_s"] else "-"
        print(f"| {name} | {r['samples_s']:.0f} | {r['audio_h_s']:.3f} | {r['batches_s']:.2f} | {keeps} |")
    if a.json:
        out = {
            "clips": a.clips,
            "audio_h": hours,
            "workers": w,
            "step_s": step,
            "rows": rows,
            "trials": trials,
        }
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
