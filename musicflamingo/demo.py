"""The main job: synthetic corpus -> SentencePiece processor -> train `small` from scratch -> evaluate -> caption.

    python -m musicflamingo.demo [--out outputs/demo] [--minutes 18] [--n-train 800]

Every stage reuses what an earlier run left (corpus, tokenizer, finished training) so a rerun resumes. The results
table (multiple-choice accuracy per question type, next to chance) is printed and written to
`<out>/results.md`.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import open_dict

log = logging.getLogger("musicflamingo.demo")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SYSTEM_PROMPT = "You are Music Flamingo, a music assistant."


def build_processor(corpus: Any, out_dir: Path, vocab_size: int, chunk_length: float) -> Path:
    """Train a SentencePiece tokenizer on the training split's text and save a processor with `chunk_length` windows."""
    from musicflamingo.data.synthetic import corpus_texts
    from musicflamingo.processor import MusicFlamingoProcessor
    from musicflamingo.tokenizer import load_tokenizer, train_sentencepiece

    if (out_dir / "processor_config.json").is_file():
        return out_dir
    train_sentencepiece(corpus_texts(corpus, splits=("train",)), vocab_size, out_dir)
    # A one-line system prompt: the release's 60-token prompt would be most of every short training sample.
    processor = MusicFlamingoProcessor(
        load_tokenizer(out_dir),
        chunk_length=chunk_length,
        max_audio_len=60.0,
        default_system_prompt=SYSTEM_PROMPT,
    )
    processor.save_pretrained(out_dir)
    return out_dir


def model_overrides(processor: Any) -> dict[str, Any]:
    """Token ids and vocabulary of the model = those of the trained tokenizer."""
    tok = processor.tokenizer
    return {
        "text": {
            "vocab_size": tok.vocab_size,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        },
        "audio_token_id": processor.audio_token_id,
        "audio_bos_token_id": processor.audio_bos_token_id,
        "audio_eos_token_id": processor.audio_eos_token_id,
    }


def _compose(config_name: str, overrides: list[str]) -> Any:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


def results_table(results: dict[str, Any]) -> str:
    """Markdown: multiple-choice accuracy per question type (both scoring rules) next to chance."""
    mcq = results.get("tasks", {}).get("mcq", {})
    head = (
        "| question type | n | accuracy (option parser) | accuracy (MMAU string match) | unparsed | chance |"
    )
    rows = [head, "|---|---|---|---|---|---|"]
    for name, g in sorted(mcq.get("by", {}).get("question_type", {}).items()):
        rows.append(
            f"| {name} | {g['n']} | {g['accuracy']:.3f} | {g['accuracy_mmau']:.3f} | {g['unparsed']} | {g['chance']:.3f} |"
        )
    if mcq:
        rows.append(
            f"| **overall** | {mcq['n']} | **{mcq['accuracy']:.3f}** | {mcq['accuracy_mmau']:.3f} | {mcq['unparsed']} "
            f"| {mcq['chance']:.3f} |"
        )
    return "\n".join(rows)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from musicflamingo.data.synthetic import build_corpus
    from musicflamingo.eval.runner import evaluate
    from musicflamingo.inference import infer
    from musicflamingo.model import MusicFlamingoConfig
    from musicflamingo.processor import MusicFlamingoProcessor
    from musicflamingo.training import train

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    timings: dict[str, float] = {}

    log.info("[1/5] synthetic corpus (%d train clips) -> %s", args.n_train, out / "synthetic")
    corpus = build_corpus(
        out / "synthetic",
        seed=args.seed,
        n_train=args.n_train,
        n_val=args.n_val,
        n_test=args.n_test,
        clip_seconds=(4.0, 6.0),
    )
    timings["corpus_s"] = time.time() - t0

    log.info("[2/5] SentencePiece tokenizer + processor")
    window = MusicFlamingoConfig.from_name("small").window_seconds
    proc_dir = build_processor(corpus, out / "synthetic" / "processor", args.vocab_size, window)
    processor = MusicFlamingoProcessor.from_pretrained(proc_dir)

    log.info("[3/5] training `small` from scratch for at most %.1f min", args.minutes)
    t1 = time.time()
    run_dir = out / "train"
    overrides = model_overrides(processor)
    hh, mm = divmod(int(args.minutes * 60), 3600)
    train_cfg = _compose(
        "train",
        [
            "experiment=synthetic_small",
            f"paths.data_dir={out}",
            f"paths.output_dir={run_dir}",
            f"paths.log_dir={out / 'logs'}",
            f"seed={args.seed}",
            f"trainer.max_steps={args.max_steps}",
            f"model.scheduler.warmup_steps={min(30, args.max_steps)}",  # the recipe's 30, or all of a short run
            f"trainer.max_time=00:{hh:02d}:{mm // 60:02d}:{mm % 60:02d}",
            "logger=csv",
        ],
    )
    with open_dict(train_cfg):
        train_cfg.model.net.overrides = overrides
        if args.threads:
            train_cfg.threads = args.threads
    export = run_dir / "export"
    if not (export / "config.json").is_file():
        metrics, _ = train(train_cfg)
        log.info("training metrics: %s", {k: round(v, 4) for k, v in metrics.items()})
    timings["train_s"] = time.time() - t1

    log.info("[4/5] evaluating on the test split")
    t2 = time.time()
    eval_cfg = _compose(
        "eval",
        [
            "benchmark=synthetic",
            f"benchmark.root={corpus.root}",
            f"ckpt={export}",
            f"output_dir={out / 'eval'}",
            "batch_size=16",
            "benchmark.max_new_tokens=48",
            "dtype=float32",
        ],
    )
    results = evaluate(eval_cfg)
    timings["eval_s"] = time.time() - t2

    log.info("[5/5] captioning one test clip with infer.py's engine")
    first = json.loads(corpus.test.read_text().splitlines()[0])
    clip = str(corpus.root / first["audio"])
    captions = infer(
        {
            "ckpt": str(export),
            "audio": clip,
            "prompt": "Describe the track.",
            "max_new_tokens": 64,
            "dtype": "float32",
            "device": "cpu",
            "stream": True,
        }
    )
    timings["total_s"] = time.time() - t0

    table = results_table(results)
    report = [
        "# Music Flamingo `small`, trained from scratch on the synthetic corpus",
        "",
        table,
        "",
        f"Caption of `{first['audio']}`: {captions[0]!r}",
        f"Ground truth: {first['conversations'][-1]['content']!r}",
        "",
        "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()),
    ]
    (out / "results.md").write_text("\n".join(report) + "\n")
    print("\n" + "\n".join(report) + "\n")
    return {"results": results, "timings": timings, "captions": captions, "table": table}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--minutes", type=float, default=18.0, help="training time budget")
    p.add_argument("--max-steps", type=int, default=1150)
    p.add_argument("--n-train", type=int, default=800)
    p.add_argument("--n-val", type=int, default=20)
    p.add_argument("--n-test", type=int, default=60)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from musicflamingo.cli import run_cli

    run_cli(lambda: run(args))


if __name__ == "__main__":
    main()
