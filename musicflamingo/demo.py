"""The main job: synthetic corpus -> SentencePiece processor -> train `small` from scratch (questions, then
questions + captions) -> evaluate -> caption.

    python -m musicflamingo.demo [--out outputs/demo] [--minutes 24] [--n-train 800]

Every stage reuses what an earlier run left (corpus, tokenizer, finished training) so a rerun resumes;
`<out>/demo.json` records the options that made them (a rerun with other ones is refused: pass another --out)
and each stage's steps and seconds. The report (multiple-choice accuracy per question type and caption facts,
each next to chance; the same model on a corpus built with another seed; three test clips captioned next to
their ground truth; the steps each stage trained) is printed and written to `<out>/results.md`.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

log = logging.getLogger("musicflamingo.demo")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SYSTEM_PROMPT = "You are Music Flamingo, a music assistant."
CLIP_SECONDS = (4.0, 6.0)
RECORD_FILE = "demo.json"
# The options that decide what a run produces: a rerun into the same --out must repeat them (--threads and --out
# do not change the numbers).
IDENTITY = (
    "seed",
    "n_train",
    "n_val",
    "n_test",
    "n_other",
    "vocab_size",
    "max_steps",
    "caption_steps",
    "minutes",
)
MAX_SEED = 2**32 - 1  # Lightning's seed_everything replaces a larger seed with 0


class DemoError(ValueError):
    """The options or the --out folder cannot give the run asked for: printed as one line, exit 2."""


def _option(key: str) -> str:
    return "--" + key.replace("_", "-")


def stage_seconds(minutes: float, steps: list[int]) -> list[int]:
    """Each training stage's share of the `--minutes` budget, in whole seconds (the recipes' step proportion)."""
    total = sum(steps)
    return [int(minutes * 60 * n / total) for n in steps]


def max_time(seconds: int) -> str:
    """Lightning's `trainer.max_time` (DD:HH:MM:SS)."""
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    return f"{days:02d}:{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"


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
            "vocab_size": len(tok),  # every id: tok.vocab_size leaves added tokens out
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


def _legacy_settings(out: Path, seed: int) -> dict[str, Any]:
    """The options an --out written before `demo.json` existed was made with, as far as its files tell."""
    found: dict[str, Any] = {}
    try:
        corpus = json.loads((out / "synthetic" / "corpus.json").read_text())["config"]
        found.update({k: corpus[k] for k in ("seed", "n_train", "n_val", "n_test")})
    except (OSError, ValueError, KeyError, TypeError):
        pass
    other = out / f"synthetic-seed{found.get('seed', seed) + 1}" / "corpus.json"
    try:
        found["n_other"] = json.loads(other.read_text())["config"]["n_test"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    for key, run_dir in (("max_steps", "train-questions"), ("caption_steps", "train")):
        try:
            found[key] = int(OmegaConf.load(out / run_dir / ".hydra" / "config.yaml").trainer.max_steps)
        except Exception:  # absent or unreadable: nothing known
            pass
    return found


def open_record(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """`<out>/demo.json`: the options of the run in `out` and what its stages did. Refuses (`DemoError`) an `out`
    holding a run made with other options, naming them: its corpus, tokenizer or trained stages would be reused
    as if they were this run's."""
    path = out / RECORD_FILE
    wanted = {k: getattr(args, k) for k in IDENTITY}
    record: dict[str, Any] = {}
    old: dict[str, Any] = {}
    if path.is_file():
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            old = record["settings"]
            if not isinstance(old, dict):
                raise TypeError("settings is not an object")
        except (ValueError, KeyError, TypeError) as e:
            raise DemoError(f"{path}: not a demo record ({e}); delete it, or pass another --out") from None
    elif out.is_dir():
        old = _legacy_settings(out, args.seed)
    # a record of a run that wrote nothing else (it stopped at once) binds nothing
    if old and any(p.name != RECORD_FILE for p in out.iterdir()):
        diff = [k for k in IDENTITY if k in old and old[k] != wanted[k]]
        if diff:
            was = " ".join(f"{_option(k)} {old[k]}" for k in diff)
            now = " ".join(f"{_option(k)} {wanted[k]}" for k in diff)
            raise DemoError(
                f"{out} holds a demo run made with {was} (now {now}): its corpus, tokenizer and training would be "
                "reused as this run's; pass another --out, or the same options to reuse or resume that run"
            )
    else:
        record = {}
    record["settings"] = wanted
    save_record(out, record)
    return record


def save_record(out: Path, record: dict[str, Any]) -> None:
    tmp = out / f".{RECORD_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    tmp.replace(out / RECORD_FILE)


def check_synthesizer(out: Path, other_seed: int) -> None:
    """FluidSynth and the General MIDI soundfont, before anything runs, when a corpus is still to be rendered."""
    from musicflamingo.data.synthetic.render import (
        DEFAULT_SOUNDFONT,
        SynthesizerNotFoundError,
        check_soundfont,
        find_fluidsynth,
    )

    if all((out / d / "corpus.json").is_file() for d in ("synthetic", f"synthetic-seed{other_seed}")):
        return
    try:
        find_fluidsynth()
        check_soundfont(DEFAULT_SOUNDFONT)
    except SynthesizerNotFoundError as e:  # a missing system package, not a bug
        raise DemoError(f"{e}; `make setup` installs them") from None


def chorale_sources(corpus: Any) -> list[str]:
    """The chorales (`bach/bwv399`) a built corpus cut its clips from, over all its splits."""
    sources = set()
    for path in corpus.manifests.values():
        with open(path, encoding="utf-8") as f:
            for line in f:
                meta = json.loads(line).get("meta", {})
                if meta.get("source_kind") == "chorale":
                    sources.add(meta["source"])
    return sorted(sources)


def _corpus(out_dir: Path, **kwargs: Any) -> Any:
    from musicflamingo.data.synthetic import CorpusConfigError, SynthesizerNotFoundError, build_corpus

    try:
        return build_corpus(out_dir, clip_seconds=CLIP_SECONDS, **kwargs)
    except CorpusConfigError as e:  # its hint names the synthetic CLI's --overwrite, which the demo has not
        raise DemoError(
            f"{str(e).split('; pass')[0]}: pass another --out, or delete {out_dir} to build it again"
        ) from None
    except SynthesizerNotFoundError as e:
        raise DemoError(f"{e}; `make setup` installs them") from None


def _evaluate(cfg: Any) -> dict[str, Any]:
    from musicflamingo.eval.runner import EvalConfigError, evaluate

    try:
        return evaluate(cfg)
    except EvalConfigError as e:  # its hint names eval.py's tag= / output_dir=, which the demo has not
        if "holds predictions of another run" not in str(e):
            raise
        raise DemoError(
            f"{str(e).split('; pass')[0]}: delete {cfg.output_dir} to score this run's model, or pass another --out"
        ) from None


def training_line(args: argparse.Namespace, done: dict[str, Any]) -> str:
    """The report's line on what was trained: steps per stage (fewer than asked: stopped by --minutes)."""
    parts = []
    for k, steps in enumerate((args.max_steps, args.caption_steps), start=1):
        got = done.get(f"stage{k}", {}).get("steps")
        if got is None:
            parts.append(f"stage {k} of {steps} steps (an earlier run's; steps done not recorded)")
        else:
            cut = f", stopped at the --minutes {args.minutes:g} time limit" if got < steps else ""
            parts.append(f"stage {k} {got} of {steps} steps{cut}")
    return (
        f"Training: {'; '.join(parts)} (seed {args.seed}, {args.n_train} training clips, "
        f"--minutes {args.minutes:g})."
    )


def timings_line(timings: dict[str, float | None], reused: list[str]) -> str:
    """Seconds per stage; a corpus or training reused from an earlier run into the same --out keeps the seconds
    recorded when it was made (n/a: made before runs recorded them), and total_s is then this run's alone."""
    line = "Timings (s): " + ", ".join(
        f"{k} {'n/a' if v is None else f'{v:.0f}'}" for k, v in timings.items()
    )
    if reused:
        line += f" ({', '.join(reused)} reused from an earlier run into this --out; total_s is this run's)"
    return line


def run(args: argparse.Namespace) -> dict[str, Any]:
    from musicflamingo.data.synthetic.text import CAPTION_PROMPT
    from musicflamingo.inference import infer
    from musicflamingo.processor import MusicFlamingoProcessor
    from musicflamingo.training import train

    out = Path(args.out).resolve()
    other_seed = args.seed + 1
    out.mkdir(parents=True, exist_ok=True)
    record = open_record(out, args)
    check_synthesizer(out, other_seed)
    done = record.setdefault("done", {})
    t0 = time.time()
    timings: dict[str, float | None] = {}
    reused: list[str] = []

    log.info("[1/6] synthetic corpus (%d train clips) -> %s", args.n_train, out / "synthetic")
    built = (out / "synthetic" / "corpus.json").is_file()
    corpus = _corpus(
        out / "synthetic", seed=args.seed, n_train=args.n_train, n_val=args.n_val, n_test=args.n_test
    )
    if built:
        reused.append("corpus")
    else:
        done["corpus_s"] = time.time() - t0
        save_record(out, record)
    timings["corpus_s"] = done.get("corpus_s")  # None: built by a run that did not record it

    # Two stages (configs/experiment/synthetic_small_captions.yaml says why): the questions from scratch, then
    # questions and captions from that model. The time budget and steps are shared in the recipes' proportion.
    stages = [
        ("synthetic_small", out / "train-questions", args.max_steps),
        ("synthetic_small_captions", out / "train", args.caption_steps),
    ]
    cfgs = []
    for (experiment, run_dir, steps), seconds in zip(
        stages, stage_seconds(args.minutes, [n for _, _, n in stages])
    ):
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
                    f"trainer.max_time={max_time(seconds)}",
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

    first_export = stages[0][1] / "export"
    train_s: float | None = 0.0
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
        stage = done.setdefault(f"stage{k + 1}", {})
        if (run_dir / "export" / "config.json").is_file():
            reused.append(f"stage {k + 1}")
        else:
            if not (run_dir / "checkpoints" / "last.ckpt").is_file():
                stage.clear()  # a fresh start: nothing of an earlier attempt counts
            t = time.time()
            try:
                metrics, objects = train(cfg)
            finally:  # an interrupted stage's seconds count when its rerun resumes it
                stage["train_s"] = stage.get("train_s", 0.0) + time.time() - t
                save_record(out, record)
            stage["steps"] = int(objects["trainer"].global_step)
            save_record(out, record)
            log.info("stage %d: loss %.4f at the last step", k + 1, metrics.get("train/loss", float("nan")))
        if stage.get("steps") is not None and stage["steps"] < steps:
            log.warning(
                "stage %d stopped at its time limit after %d of %d steps (--minutes %g): the results are those "
                "of a shorter training than the recipe's",
                k + 1,
                stage["steps"],
                steps,
                args.minutes,
            )
        train_s = None if train_s is None or "train_s" not in stage else train_s + stage["train_s"]
    export = stages[-1][1] / "export"
    timings["train_s"] = train_s

    log.info("[4/6] evaluating on the test split (questions and captions)")
    t2 = time.time()
    results = _evaluate(_eval_config(corpus.root, export, out / "eval", captions=True))
    timings["eval_s"] = time.time() - t2

    # The same model on clips of a corpus built with another seed: other pieces, keys, tempi and instruments drawn
    # afresh, so a gap to the test split would mean the model learnt its corpus rather than the music.
    log.info("[5/6] generalisation: %d clips of a corpus built with seed %d", args.n_other, other_seed)
    t3 = time.time()
    other = _corpus(
        out / f"synthetic-seed{other_seed}",
        seed=other_seed,
        n_train=0,
        n_val=0,
        n_test=args.n_other,
        exclude_sources=chorale_sources(corpus),  # other pieces: none of the chorales this model trained on
    )
    other_results = _evaluate(
        _eval_config(other.root, export, out / f"eval-seed{other_seed}", captions=False)
    )
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
    report += ["", training_line(args, done), "", timings_line(timings, reused)]
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


def _integer(low: int, high: int | None = None, unset: str = "") -> Any:
    """An argparse type: an integer in [low, high]; the error names what was expected and what was given."""
    expected = f"an integer >= {low}" if high is None else f"an integer in {low}..{high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}{unset}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {expected}{unset}, got {value}")
        return value

    return parse


def _minutes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number of minutes > 0, got {text!r}")
    return value


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from musicflamingo.tokenizer import SPECIAL_TOKENS

    p = argparse.ArgumentParser(
        prog="python -m musicflamingo.demo", description=__doc__, formatter_class=_HelpFormatter
    )
    p.add_argument("--out", default="outputs/demo", help="folder of the run (a rerun reuses and resumes it)")
    p.add_argument("--minutes", type=_minutes, default=24.0, help="training time budget, both stages")
    p.add_argument("--max-steps", type=_integer(1), default=1000, help="stage 1 (questions) steps")
    p.add_argument(
        "--caption-steps", type=_integer(1), default=1000, help="stage 2 (questions + captions) steps"
    )
    p.add_argument("--n-train", type=_integer(1), default=800, help="training clips")
    p.add_argument("--n-val", type=_integer(0), default=20, help="validation clips")
    p.add_argument("--n-test", type=_integer(1), default=100, help="test clips")
    p.add_argument(
        "--n-other",
        type=_integer(1),
        default=100,
        help="clips of the other-seed corpus (generalisation check)",
    )
    # byte-fallback pieces + the special tokens + <unk> (tokenizer.train_sentencepiece)
    p.add_argument(
        "--vocab-size",
        type=_integer(256 + len(SPECIAL_TOKENS) + 1),
        default=1024,
        help="SentencePiece vocabulary",
    )
    p.add_argument(
        "--seed", type=_integer(0, MAX_SEED), default=0, help="corpus, initialisation and data order"
    )
    p.add_argument(
        "--threads",
        type=_integer(1, unset=" (leave it out for torch's default)"),
        default=None,
        help="CPU threads (none: torch's default)",
    )
    args = p.parse_args(argv)
    # each stage needs a second at least: a budget of 0 s would export an untrained model as the result
    steps = [args.max_steps, args.caption_steps]
    for k, seconds in enumerate(stage_seconds(args.minutes, steps), start=1):
        if seconds < 1:
            p.error(
                f"argument --minutes: {args.minutes:g} gives training stage {k} {seconds} s "
                f"({steps[k - 1]} of {sum(steps)} steps); expected at least 1 s a stage"
            )
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from musicflamingo.cli import run_cli

    run_cli(lambda: run(args))


if __name__ == "__main__":
    main()
