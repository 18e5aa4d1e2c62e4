"""The main job: synthetic corpus -> SentencePiece processor -> train `small` from scratch (questions, then
questions + captions) -> evaluate -> caption.

    python -m musicflamingo.demo [--out outputs/demo] [--minutes 18] [--n-train 800]

Every stage reuses what an earlier run left (corpus, tokenizer, finished training) so a rerun resumes. The report
(multiple-choice accuracy per question type and caption facts, each next to chance; the same model on a corpus
built with another seed; three test clips captioned next to their ground truth) is printed and written to
`<out>/results.md`.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import logging
import time
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

log = logging.getLogger("musicflamingo.demo")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SYSTEM_PROMPT = "You are Music Flamingo, a music assistant."
CLIP_SECONDS = (4.0, 6.0)


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


def model_window(net: Any) -> float:
    """Seconds per encoder window of a `model.net` config (preset + overrides): the processor's must match, and an
    experiment may set its own (`overrides.audio.max_source_positions`)."""
    from musicflamingo.model import MusicFlamingoConfig

    arch = OmegaConf.to_container(net.overrides, resolve=True) or {}
    return MusicFlamingoConfig.from_name(net.preset, **copy.deepcopy(arch)).window_seconds


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


def facts_table(results: dict[str, Any]) -> str:
    """Markdown: per fact, the share of test captions stating it correctly (``eval.metrics.score_caption_facts``)
    next to chance, and the mean over the facts."""
    cap = results.get("tasks", {}).get("caption", {})
    facts = cap.get("facts") or {}
    if not facts:
        return "(no caption records with facts were scored)"
    rows = ["| fact | n | stated correctly | chance |", "|---|---|---|---|"]
    for name, f in sorted(facts.items()):
        rows.append(f"| {name} | {f['n']} | {f['accuracy']:.3f} | {f['chance']:.3f} |")
    rows.append(f"| **mean** | {cap['n']} | **{cap['facts_mean']:.3f}** | {cap['facts_chance_mean']:.3f} |")
    return "\n".join(rows)


def generalisation_table(own: dict[str, Any], other: dict[str, Any]) -> str:
    """Markdown: MCQ accuracy (option parser) per question type on the test split and on the other-seed corpus,
    and the difference in points."""

    def by_type(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
        mcq = results.get("tasks", {}).get("mcq", {})
        return {**mcq.get("by", {}).get("question_type", {}), "overall": mcq} if mcq else {}

    a, b = by_type(own), by_type(other)
    rows = ["| question type | test split | other seed (n) | difference (points) |", "|---|---|---|---|"]
    for name in [k for k in a if k != "overall"] + ["overall"]:
        if name in a and name in b:
            d = 100 * (b[name]["accuracy"] - a[name]["accuracy"])
            rows.append(
                f"| {name} | {a[name]['accuracy']:.3f} | {b[name]['accuracy']:.3f} ({b[name]['n']}) | {d:+.1f} |"
            )
    return "\n".join(rows)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from musicflamingo.data.synthetic import build_corpus
    from musicflamingo.data.synthetic.text import CAPTION_PROMPT
    from musicflamingo.eval.runner import evaluate
    from musicflamingo.inference import infer
    from musicflamingo.processor import MusicFlamingoProcessor
    from musicflamingo.training import train

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    timings: dict[str, float] = {}

    log.info("[1/6] synthetic corpus (%d train clips) -> %s", args.n_train, out / "synthetic")
    corpus = build_corpus(
        out / "synthetic",
        seed=args.seed,
        n_train=args.n_train,
        n_val=args.n_val,
        n_test=args.n_test,
        clip_seconds=CLIP_SECONDS,
    )
    timings["corpus_s"] = time.time() - t0

    # Two stages (configs/experiment/synthetic_small_captions.yaml says why): the questions from scratch, then
    # questions and captions from that model. The time budget and steps are shared in the recipes' proportion.
    stages = [
        ("synthetic_small", out / "train-questions", args.max_steps),
        ("synthetic_small_captions", out / "train", args.caption_steps),
    ]
    total_steps = sum(n for _, _, n in stages)
    cfgs = []
    for experiment, run_dir, steps in stages:
        seconds = int(args.minutes * 60 * steps / total_steps)
        hh, mm = divmod(seconds, 3600)
        cfgs.append(
            _compose(
                "train",
                [
                    f"experiment={experiment}",
                    f"paths.data_dir={out}",
                    f"paths.output_dir={run_dir}",
                    f"paths.log_dir={out / 'logs'}",
                    f"seed={args.seed}",
                    f"trainer.max_steps={steps}",
                    # the recipe's warm-up, or all of a short run
                    f"model.scheduler.warmup_steps={min(30 if not cfgs else 20, steps)}",
                    f"trainer.max_time=00:{hh:02d}:{mm // 60:02d}:{mm % 60:02d}",
                    "logger=csv",
                ],
            )
        )
    net = cfgs[0].model.net
    arch = OmegaConf.to_container(net.overrides, resolve=True) or {}
    window = model_window(net)

    log.info("[2/6] SentencePiece tokenizer + processor (%g s windows)", window)
    proc_dir = build_processor(corpus, out / "synthetic" / "processor", args.vocab_size, window)
    processor = MusicFlamingoProcessor.from_pretrained(proc_dir)

    t1 = time.time()
    first_export = stages[0][1] / "export"
    for k, ((_, run_dir, steps), cfg) in enumerate(zip(stages, cfgs)):
        what = "questions, `small` from scratch" if k == 0 else "questions + captions, from stage 1"
        log.info(
            "[3/6] training stage %d/2 (%s): %d steps, at most %s", k + 1, what, steps, cfg.trainer.max_time
        )
        with open_dict(cfg):
            if k == 0:
                cfg.model.net.overrides = {**arch, **model_overrides(processor)}
            else:
                cfg.model.net.init_from = str(first_export)
            if args.threads:
                cfg.threads = args.threads
        if not (run_dir / "export" / "config.json").is_file():
            metrics, _ = train(cfg)
            log.info("stage %d: loss %.4f at the last step", k + 1, metrics.get("train/loss", float("nan")))
    export = stages[-1][1] / "export"
    timings["train_s"] = time.time() - t1

    log.info("[4/6] evaluating on the test split (questions and captions)")
    t2 = time.time()
    results = evaluate(_eval_config(corpus.root, export, out / "eval", captions=True))
    timings["eval_s"] = time.time() - t2

    # The same model on clips of a corpus built with another seed: other pieces, keys, tempi and instruments drawn
    # afresh, so a gap to the test split would mean the model learnt its corpus rather than the music.
    other_seed = args.seed + 1
    log.info("[5/6] generalisation: %d clips of a corpus built with seed %d", args.n_other, other_seed)
    t3 = time.time()
    other = build_corpus(
        out / f"synthetic-seed{other_seed}",
        seed=other_seed,
        n_train=0,
        n_val=0,
        n_test=args.n_other,
        clip_seconds=CLIP_SECONDS,
    )
    other_results = evaluate(_eval_config(other.root, export, out / f"eval-seed{other_seed}", captions=False))
    timings["generalisation_s"] = time.time() - t3

    log.info("[6/6] captioning three test clips with infer.py's engine")
    t4 = time.time()
    clips = [
        json.loads(line) for line in corpus.test.read_text().splitlines() if '"task": "caption"' in line
    ][:3]
    captions = infer(
        {
            "ckpt": str(export),
            "audio": [str(corpus.root / c["audio"]) for c in clips],
            "prompt": CAPTION_PROMPT,
            "max_new_tokens": 64,
            "dtype": "float32",
            "device": "cpu",
            "stream": False,
        },
        out=io.StringIO(),  # printed below, each next to its ground truth
    )
    timings["captions_s"] = time.time() - t4
    timings["total_s"] = time.time() - t0

    table = results_table(results)
    report = [
        "# Music Flamingo `small`, trained from scratch on the synthetic corpus",
        "",
        "## Multiple-choice questions (test split)",
        "",
        table,
        "",
        "## Captions (test split): facts stated correctly",
        "",
        facts_table(results),
        "",
        f"## Generalisation: the same model on a corpus built with seed {other_seed}",
        "",
        generalisation_table(results, other_results),
        "",
        "## Three test clips captioned by infer.py",
        "",
    ]
    for c, text in zip(clips, captions):
        report += [
            f"- `{c['audio']}`",
            f"  - model: {text!r}",
            f"  - truth: {c['conversations'][-1]['content']!r}",
        ]
    report += ["", "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())]
    (out / "results.md").write_text("\n".join(report) + "\n")
    print("\n" + "\n".join(report) + "\n")
    return {
        "results": results,
        "other_results": other_results,
        "timings": timings,
        "captions": captions,
        "table": table,
    }


def _eval_config(root: Path, export: Path, output_dir: Path, captions: bool) -> Any:
    return _compose(
        "eval",
        [
            "benchmark=synthetic",
            f"benchmark.root={root}",
            f"benchmark.include_captions={str(captions).lower()}",
            f"ckpt={export}",
            f"output_dir={output_dir}",
            "batch_size=16",
            "benchmark.max_new_tokens=48",
            "dtype=float32",
        ],
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--minutes", type=float, default=18.0, help="training time budget")
    p.add_argument("--max-steps", type=int, default=1000, help="stage 1 (questions) steps")
    p.add_argument("--caption-steps", type=int, default=500, help="stage 2 (questions + captions) steps")
    p.add_argument("--n-train", type=int, default=800)
    p.add_argument("--n-val", type=int, default=20)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument(
        "--n-other", type=int, default=100, help="clips of the other-seed corpus (generalisation check)"
    )
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from musicflamingo.cli import run_cli

    run_cli(lambda: run(args))


if __name__ == "__main__":
    main()
