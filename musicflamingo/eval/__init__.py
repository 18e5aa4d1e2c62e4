"""Evaluation: benchmark readers (each public release as its authors distribute it), answer parsers, metrics,
reports (with the paper's numbers and the official scorers' prediction files) and the resumable runner.

``evaluate(cfg)`` runs one benchmark from a composed ``configs/eval.yaml``; ``run_benchmark(items, predict_fn,
out_dir, batch_size)`` runs any list of :class:`EvalItem` with any ``predict_fn(list[EvalItem]) -> list[str]``.
Release layouts and scoring rules: docs/evaluation.md.
"""

from musicflamingo.eval.benchmarks import (
    LAYOUTS,
    READERS,
    Benchmark,
    BenchmarkError,
    EvalItem,
    build_benchmark,
    read_records,
)
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
    muchomusic_choice,
    parse_choice,
    parse_label,
)
from musicflamingo.eval.report import (
    PAPER_RESULTS,
    markdown_report,
    paper_comparison,
    write_official_predictions,
    write_plots,
    write_report,
)
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
    "LAYOUTS",
    "PAPER_RESULTS",
    "READERS",
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
    "muchomusic_choice",
    "normalize_lyrics",
    "paper_comparison",
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
    "write_official_predictions",
    "write_plots",
    "write_report",
]
