"""Evaluation: benchmark readers, answer parsers, metrics, reports and the resumable runner.

``evaluate(cfg)`` runs one benchmark from a composed ``configs/eval.yaml``; ``run_benchmark(items, predict_fn,
out_dir, batch_size)`` runs any list of :class:`EvalItem` with any ``predict_fn(list[EvalItem]) -> list[str]``.
Scoring rules: docs/evaluation.md.
"""

from musicflamingo.eval.benchmarks import Benchmark, BenchmarkError, EvalItem, build_benchmark, read_records
from musicflamingo.eval.metrics import (
    aspect_mentioned,
    error_rate,
    normalize_lyrics,
    score_caption,
    score_classification,
    score_items,
    score_lyrics,
    score_mcq,
)
from musicflamingo.eval.parsing import (
    ChoiceParse,
    format_options,
    mmau_string_match,
    parse_choice,
    parse_label,
)
from musicflamingo.eval.report import markdown_report, write_plots, write_report
from musicflamingo.eval.runner import (
    EvalConfigError,
    PredictionsFileError,
    build_predict_fn,
    check_checkpoint,
    evaluate,
    headline,
    load_predictions,
    predict_items,
    run_benchmark,
)

__all__ = [
    "Benchmark",
    "BenchmarkError",
    "ChoiceParse",
    "EvalConfigError",
    "EvalItem",
    "PredictionsFileError",
    "aspect_mentioned",
    "build_benchmark",
    "build_predict_fn",
    "check_checkpoint",
    "error_rate",
    "evaluate",
    "format_options",
    "headline",
    "load_predictions",
    "markdown_report",
    "mmau_string_match",
    "normalize_lyrics",
    "parse_choice",
    "parse_label",
    "predict_items",
    "read_records",
    "run_benchmark",
    "score_caption",
    "score_classification",
    "score_items",
    "score_lyrics",
    "score_mcq",
    "write_plots",
    "write_report",
]
