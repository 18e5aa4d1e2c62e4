"""Reports: ``results.json``, ``results.md`` (Markdown tables, with the Music Flamingo paper's number next to
ours), PNG plots (matplotlib, Agg canvas) and prediction files in the layout the benchmarks' official scorers
read (MMAU, MMAR, MuChoMusic, MMAU-Pro).

Plots are drawn on ``matplotlib.figure.Figure`` + ``FigureCanvasAgg`` directly, never through pyplot, so no
global backend is switched and nothing needs a display.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from musicflamingo.checkpoint import replace_file
from musicflamingo.eval.benchmarks import EvalItem

TASK_TITLES = {
    "mcq": "Multiple choice",
    "classification": "Classification",
    "caption": "Captioning",
    "open_qa": "Open questions",
    "lyrics": "Lyrics transcription",
}


# --------------------------------------------------------------------------------------------------------------
# The paper's numbers
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PaperNumber:
    """One number of the Music Flamingo paper (arXiv 2511.10289, Table 1) and where ours is in the results.

    ``benchmark`` is the config name (``configs/benchmark/<name>.yaml``); ``when`` lists the benchmark settings
    the number is for (e.g. the MMAU split); ``metric`` is the key of our task summary it compares with (None:
    we compute no comparable number); ``group`` is the ``(field, value)`` of our breakdown that is the paper's
    subset (e.g. MMAU's music questions). ``scored_upstream`` names the reasons our reader skips rows for that
    the benchmark's own scorer scores (MMAU-Pro's multi-audio questions): rows of the paper's subset skipped for
    one of them make our number one over fewer questions (:func:`paper_comparison` says so). Values are
    percentages, as printed in the paper.
    """

    benchmark: str
    label: str
    value: float
    task: str
    metric: str | None
    group: tuple[str, str] | None = None
    when: tuple[tuple[str, Any], ...] = ()
    note: str = ""
    scored_upstream: tuple[str, ...] = ()


def _release(fmt: str, **settings: str) -> tuple[tuple[str, Any], ...]:
    """``when`` of a paper number: the release's own reader (a user's JSONL through another format is not the
    paper's test set) and its split or subset."""
    return (("format", fmt), *settings.items())


PAPER_RESULTS: tuple[PaperNumber, ...] = (
    PaperNumber(
        "mmau",
        "MMAU-Music (test-mini)",
        76.35,
        "mcq",
        "accuracy",
        ("task", "music"),
        _release("mmau", split="test-mini"),
    ),
    PaperNumber(
        "mmau",
        "MMAU-Music (test)",
        76.83,
        "mcq",
        None,
        ("task", "music"),
        _release("mmau", split="test"),
        "answers withheld: submit mmau_predictions.json to the MMAU Eval HF Space",
    ),
    PaperNumber(
        "mmau_pro",
        "MMAU-Pro-Music",
        65.60,
        "mcq",
        "accuracy",
        ("category", "music"),
        _release("mmau_pro"),
        "its scorer picks the option nearest the answer (NV-Embed-v2), never none: run it on "
        "mmau_pro_predictions.parquet",
        scored_upstream=("several audio files", "no audio file"),
    ),
    PaperNumber("muchomusic", "MuChoMusic", 74.58, "mcq", "accuracy", when=_release("muchomusic")),
    PaperNumber("mmar", "MMAR-music", 48.66, "mcq", "accuracy", ("modality", "music"), _release("mmar")),
    PaperNumber(
        "music_instruct",
        "Music Instruct",
        97.1,
        "open_qa",
        None,
        when=_release("music_instruct", split="test"),
        note="model-judged score; we report BLEU / ROUGE-L",
    ),
    PaperNumber(
        "music_avqa",
        "MusicAVQA",
        73.6,
        "mcq",
        "accuracy",
        when=_release("music_avqa", split="test", modalities=["Audio"]),  # the audio questions alone
    ),
    PaperNumber(
        "nsynth_source",
        "NSynth (source)",
        75.89,
        "classification",
        "accuracy",
        when=_release("nsynth", split="test"),
    ),
    PaperNumber(
        "nsynth_family",
        "NSynth (instrument)",
        80.76,
        "classification",
        "accuracy",
        when=_release("nsynth", split="test"),
    ),
    PaperNumber("gtzan", "GTZAN", 84.45, "classification", "accuracy", when=_release("gtzan")),
    PaperNumber(
        "medley_solos",
        "Medley-solos-DB",
        90.86,
        "classification",
        "accuracy",
        when=_release("medley_solos", subset="test"),
    ),
    PaperNumber(
        "opencpop",
        "Opencpop (WER)",
        12.9,
        "lyrics",
        "cer",
        when=_release("opencpop", split="test"),
        note="Chinese: our error rate is CER",
    ),
    PaperNumber(
        "musdb18_lyrics",
        "MUSDB18 lyrics (WER)",
        19.6,
        "lyrics",
        "wer",
        when=_release(
            "musdb18_lyrics", split="test", unit="song"
        ),  # whole songs: per-line WER is another number
    ),
)


def not_comparable(results: Mapping[str, Any]) -> str:
    """Why this run's numbers are not over the release's items ("" when they are): ``limit`` left some out, or
    items were dropped for missing or unreadable audio. (A filter such as MMAU's ``tasks=[music]`` keeps the
    paper's subset whole: its number is compared with that subset's row.)"""
    counts = results.get("counts") or {}
    unreadable = len(results.get("skipped_unreadable_audio") or [])
    missing = results.get("skipped_missing_audio") or 0
    total = counts.get("items", results.get("num_items", 0)) + missing
    predicted = results.get("num_predicted", results.get("num_items", 0))
    if predicted >= total:
        return ""
    why = [f"limit={results['limit']}"] if results.get("limit") is not None else []
    why += [f"{missing} audio missing"] if missing else []
    why += [f"{unreadable} audio unreadable"] if unreadable else []
    return f"n={predicted} of {total} items" + (f" ({', '.join(why)})" if why else "") + ", not comparable"


def _skipped_upstream(results: Mapping[str, Any], p: PaperNumber) -> str:
    """Why ``p`` is not comparable for rows our reader skipped that its scorer scores ("" when none were): the
    rows of ``p``'s group by reason (``counts.skipped_rows_by``), or all rows skipped for the reason when the
    results do not count them by group."""
    counts = results.get("counts") or {}
    skipped, by = counts.get("skipped_rows") or {}, counts.get("skipped_rows_by") or {}
    out = []
    for reason in p.scored_upstream:
        n = skipped.get(reason, 0)
        if p.group and reason in by:
            n = ((by[reason].get(p.group[0])) or {}).get(p.group[1], 0)
        if n:
            out.append(f"{n} {p.group[1] + ' ' if p.group else ''}rows skipped ({reason})")
    if not out:
        return ""
    return f"{', '.join(out)} that the benchmark's scorer scores, not comparable"


def _setting(value: Any, expected: Any) -> str:
    """A run's setting as the paper table writes it: a filter given as one value is a list of one."""
    if isinstance(expected, list) and isinstance(value, str):
        value = [value]
    return str(list(value) if isinstance(value, (list, tuple)) else value)


def paper_comparison(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The paper's numbers that apply to this run, each with ours (as percentages): ``{label, paper, ours,
    ours_mmau, n, note}``; ``ours`` is None when the run has no comparable number (answers withheld, a subset
    that was filtered out, a metric we cannot compute). A run over part of the items (:func:`not_comparable`)
    keeps its numbers, with a note saying so."""
    settings = results.get("settings") or {}
    partial = not_comparable(results)
    out = []
    for p in PAPER_RESULTS:
        if p.benchmark != results.get("benchmark"):
            continue
        if any(_setting(settings.get(k), v) != str(v) for k, v in p.when):
            continue
        summary = (results.get("tasks") or {}).get(p.task) or {}
        ungrouped = ""
        if p.group and summary:
            by = summary.get("by") or {}
            if p.group[0] not in by and summary.get("n"):  # benchmark.group_by=[difficulty]: no subset rows
                ungrouped = f"no {p.group[0]}={p.group[1]} row: add {p.group[0]} to benchmark.group_by"
            summary = (by.get(p.group[0]) or {}).get(p.group[1]) or {}
        ours = summary.get(p.metric) if p.metric else None
        mmau = summary.get("accuracy_mmau") if p.metric == "accuracy" else None
        out.append(
            {
                "label": p.label,
                "paper": p.value,
                "ours": None if ours is None else 100 * ours,
                "ours_mmau": None if mmau is None else 100 * mmau,
                "n": summary.get("n", 0),
                "metric": p.metric or "n/a",
                "note": "; ".join(
                    x for x in (partial, ungrouped, _skipped_upstream(results, p), p.note) if x
                ),
            }
        )
    return out


def _languages(lyrics: Mapping[str, Any]) -> str:
    """ ", ja, th": the languages a lyrics summary scored with CER (read from ``per_language`` in a results.json
    written before ``cer_language_codes``)."""
    codes = lyrics.get("cer_language_codes")
    if codes is None:
        codes = [
            k for k, v in (lyrics.get("per_language") or {}).items() if v.get("metric") == "cer" and v["n"]
        ]
    return "".join(f", {c}" for c in codes)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _num(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "field"


def write_text(path: str | Path, text: str) -> Path:
    """``text`` as UTF-8 into ``path``, replaced whole (:func:`replace_file`)."""
    return replace_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented UTF-8 JSON (NaN-free: None stands for "not defined"), replaced whole."""
    return write_text(path, json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def markdown_report(results: Mapping[str, Any]) -> str:
    """The Markdown summary written to ``results.md``."""
    out = [f"# {results['benchmark']}", ""]
    predicted = results.get(
        "num_predicted", results["num_scored"]
    )  # a results.json from before num_predicted: num_scored counted the predictions
    limit = f" (limit={results['limit']})" if results.get("limit") is not None else ""
    if results.get("limit_kept"):  # runner.limit_items: not the first N items a fresh folder would take
        limit = (
            f" (limit={results['limit']}: {results['limit_kept']} of them answered by an earlier run past the "
            f"first {results['limit']}, in place of unanswered ones)"
        )
    out.append(f"- items predicted: {predicted} of {results['num_items']}{limit}")
    scored = f"- items scored: {results['num_scored']}"
    if results.get("num_withheld"):
        scored += f", answers withheld (predicted, not scored): {results['num_withheld']}"
    empty = sum(s.get("empty_references", 0) for s in results["tasks"].values())
    if empty:
        scored += f", empty references (predicted, not scored): {empty}"
    out += [scored, f"- data: `{results.get('source', '')}`"]
    counts = results.get("counts") or {}
    if counts:
        out.append(f"- rows read: {counts.get('rows', 0)}, items: {counts.get('items', 0)}")
        for why, n in sorted((counts.get("skipped_rows") or {}).items()):
            out.append(f"- rows skipped ({why}): {n}")
    if results.get("skipped_missing_audio"):
        out.append(f"- items dropped (audio missing): {results['skipped_missing_audio']}")
    unreadable = results.get("skipped_unreadable_audio") or []
    if unreadable:
        out.append(f"- items dropped (audio unreadable): {len(unreadable)}")
        out += [f"  - `{u['audio']}` (id {u['id']}): {u['reason']}" for u in unreadable]
    if results.get("ckpt"):
        out.append(f"- checkpoint: `{results['ckpt']}`")
    for path in (results.get("files") or {}).get("official") or []:
        out.append(f"- for the official scorer: `{Path(path).name}` (docs/evaluation.md has the command)")
    paper = paper_comparison(results)
    if paper:
        out += ["", "## Music Flamingo paper (Table 1) and this run", ""]
        out += _table(
            ["benchmark", "metric", "paper (%)", "ours (%)", "ours, MMAU rule (%)", "n", "note"],
            [
                [
                    r["label"],
                    r["metric"],
                    f"{r['paper']:.2f}",
                    _num(r["ours"], 2),
                    _num(r["ours_mmau"], 2),
                    r["n"],
                    r["note"],
                ]
                for r in paper
            ],
        )
    for task, s in results["tasks"].items():
        out += ["", f"## {TASK_TITLES.get(task, task)} (n={s.get('n', 0)})", ""]
        if task in ("mcq", "classification"):
            rows = [
                ["accuracy (letter/option parser)", _pct(s.get("accuracy"))],
                ["accuracy (MMAU string match)", _pct(s.get("accuracy_mmau"))],
                ["chance", _pct(s.get("chance"))],
                ["unparsed answers (scored wrong)", s.get("unparsed", 0)],
                ["ambiguous answers (scored wrong)", s.get("ambiguous", 0)],
            ]
            if task == "classification":
                rows += [
                    ["balanced accuracy", _pct(s.get("balanced_accuracy"))],
                    ["macro F1", _num(s.get("macro_f1"))],
                ]
            else:
                if s.get("accuracy_official") is not None:
                    rows.insert(2, ["accuracy (the benchmark's own parser)", _pct(s["accuracy_official"])])
                if s.get("answer_not_in_choices"):
                    rows.append(["answer not among choices (letter rule: wrong)", s["answer_not_in_choices"]])
                if s.get("repeated_answer"):
                    rows.append(["answer text under several letters (any is right)", s["repeated_answer"]])
                if s.get("withheld"):
                    rows.append(["answers withheld (not scored)", s["withheld"]])
            out += _table(["metric", "value"], rows)
            for field, groups in (s.get("by") or {}).items():
                out += ["", f"### by {field}", ""]
                out += _table(
                    [field, "n", "accuracy", "accuracy (MMAU)", "chance", "unparsed", "ambiguous"],
                    [
                        [
                            v,
                            g["n"],
                            _pct(g["accuracy"]),
                            _pct(g["accuracy_mmau"]),
                            _pct(g["chance"]),
                            g["unparsed"],
                            g["ambiguous"],
                        ]
                        for v, g in groups.items()
                    ],
                )
            if task == "classification":
                labels = s["labels"]
                out += ["", "### confusion matrix (rows: true label, columns: parsed answer)", ""]
                out += _table(
                    ["true \\ predicted", *labels, "none"],
                    [[lab, *row] for lab, row in zip(labels, s["confusion"])],
                )
        elif task in ("caption", "open_qa"):
            out += _table(
                ["metric", "value"],
                [
                    ["BLEU (sacrebleu, 0-100)", _num(s.get("bleu"), 2)],
                    ["ROUGE-L F1", _num(s.get("rougeL"))],
                    ["aspect recall (mean over items)", _num(s.get("aspect_recall"))],
                    ["aspect recall (pooled)", _num(s.get("aspect_recall_micro"))],
                    ["empty predictions", s.get("empty_predictions", 0)],
                ],
            )
        elif task == "lyrics":
            out += _table(
                ["metric", "value"],
                [
                    [f"WER ({s.get('n_wer', 0)} items)", _num(s.get("wer"))],
                    [f"CER{_languages(s)} ({s.get('n_cer', 0)} items)", _num(s.get("cer"))],
                    ["empty references (not scored)", s.get("empty_references", 0)],
                ],
            )
            out += ["", "### by language", ""]
            out += _table(
                ["language", "n", "metric", "error"],
                [[k, v["n"], v["metric"], _num(v["error"])] for k, v in s.get("per_language", {}).items()],
            )
            if s.get("alt_eval"):
                out += _alt_eval_table(s["alt_eval"])
    return "\n".join(out) + "\n"


ALT_EVAL_COLUMNS = (
    ("WER", "WER"),
    ("WER_case", "WER (case)"),
    ("F1_punc", "F1 punct."),
    ("F1_pare", "F1 paren."),
    ("F1_line", "F1 line br."),
    ("F1_sect", "F1 section br."),
)


def _alt_eval_table(a: Mapping[str, Any]) -> list[str]:
    """Jam-ALT's own metrics (alt-eval), overall and per language, as its paper reports them (percentages)."""
    out = ["", f"### Jam-ALT metrics (alt-eval, {a.get('n', 0)} items)", ""]
    per_language = a.get("per_language") or {}
    if a.get("error"):
        out.append(a["error"])
        if not per_language:
            return out
        out.append("")
    # a language alt-eval does not know: its row says so (n/a), the others are scored
    rows = [] if a.get("error") else [["all", a.get("n", 0), *(_pct(a.get(k)) for k, _ in ALT_EVAL_COLUMNS)]]
    rows += [
        [lang, v.get("n", 0), *(_pct(v.get(k)) for k, _ in ALT_EVAL_COLUMNS)]
        for lang, v in per_language.items()
    ]
    out += _table(["language", "n", *(title for _, title in ALT_EVAL_COLUMNS)], rows)
    notes = [
        f"- {lang}: {v['error']}"
        for lang, v in per_language.items()
        if v.get("error") not in (None, a.get("error"))
    ]
    out += [""] + notes if notes else []
    out += [
        "",
        "alt-eval tokenises with Moses (contractions split, case and punctuation kept as tokens), so its WER is "
        "not our WER above; results.json's `alt_eval` holds every precision and recall.",
    ]
    return out


# --------------------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------------------
def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_accuracy(groups: Mapping[str, Mapping[str, Any]], title: str, path: str | Path) -> Path:
    """Horizontal bars per category: letter-parser and MMAU-rule accuracy, chance as a black tick."""
    names = list(groups)
    fig = _figure(8.0, 1.2 + 0.45 * len(names))
    ax = fig.add_subplot(1, 1, 1)
    ys = range(len(names))
    acc = [100 * (groups[n]["accuracy"] or 0.0) for n in names]
    mmau = [100 * (groups[n]["accuracy_mmau"] or 0.0) for n in names]
    ax.barh([y - 0.2 for y in ys], acc, height=0.4, label="letter/option parser")
    ax.barh([y + 0.2 for y in ys], mmau, height=0.4, label="MMAU string match")
    chance = [100 * (groups[n].get("chance") or 0.0) for n in names]
    ax.scatter(chance, list(ys), marker="|", s=300, color="black", label="chance", zorder=3)
    ax.set_yticks(list(ys), [f"{n} (n={groups[n]['n']})" for n in names])
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("accuracy (%)")
    ax.set_title(title, pad=28)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, fontsize=8, frameon=False)
    fig.tight_layout()
    replace_file(path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))
    return Path(path)


def plot_confusion(labels: list[str], confusion: list[list[int]], path: str | Path, title: str = "") -> Path:
    """Confusion matrix heat map (rows: true label, columns: parsed answer incl. ``none``)."""
    k = len(labels)
    size = max(4.0, 0.6 * (k + 1) + 2)
    fig = _figure(size, size * 0.85)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(confusion, cmap="Blues", aspect="auto")
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_xticks(range(k + 1), [*labels, "none"], rotation=45, ha="right")
    ax.set_yticks(range(k), labels)
    top = max((max(r) for r in confusion), default=0)
    for i, row in enumerate(confusion):
        for j, v in enumerate(row):
            if v:
                ax.text(
                    j,
                    i,
                    str(v),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if v > top / 2 else "black",
                )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix")
    fig.tight_layout()
    replace_file(path, lambda tmp: fig.savefig(tmp, format="png"))
    return Path(path)


def plot_values(values: Mapping[str, float | None], title: str, ylabel: str, path: str | Path) -> Path:
    """Simple vertical bar chart of named values (None drawn as 0 and labelled n/a)."""
    names = list(values)
    fig = _figure(max(4.0, 1.2 * len(names) + 1), 3.5)
    ax = fig.add_subplot(1, 1, 1)
    heights = [0.0 if values[n] is None or math.isnan(values[n]) else values[n] for n in names]
    bars = ax.bar(names, heights)
    for b, n in zip(bars, names):
        label = "n/a" if values[n] is None else f"{values[n]:.3f}"
        ax.annotate(
            label, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8
        )
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    replace_file(path, lambda tmp: fig.savefig(tmp, format="png"))
    return Path(path)


def write_plots(results: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """All PNGs for ``results``: accuracy per category for every group field (or overall), the confusion
    matrix for classification, metric bars for captioning and lyrics."""
    out_dir = Path(out_dir)
    name = results["benchmark"]
    paths: list[Path] = []
    for task, s in results["tasks"].items():
        if not s.get("n"):
            continue
        if task in ("mcq", "classification"):
            by = s.get("by") or {}
            for field, groups in by.items():
                paths.append(
                    plot_accuracy(
                        groups, f"{name}: accuracy by {field}", out_dir / f"accuracy_by_{_safe(field)}.png"
                    )
                )
            if not by:
                overall = {"all": {k: s.get(k) for k in ("n", "accuracy", "accuracy_mmau", "chance")}}
                paths.append(plot_accuracy(overall, f"{name}: accuracy", out_dir / "accuracy.png"))
            if task == "classification":
                paths.append(
                    plot_confusion(
                        s["labels"],
                        s["confusion"],
                        out_dir / "confusion_matrix.png",
                        f"{name}: confusion matrix",
                    )
                )
        elif task in ("caption", "open_qa"):
            vals = {
                "BLEU/100": None if s["bleu"] is None else s["bleu"] / 100,
                "ROUGE-L": s["rougeL"],
                "aspect recall": s["aspect_recall"],
            }
            paths.append(
                plot_values(
                    vals, f"{name}: {TASK_TITLES[task].lower()}", "score", out_dir / f"{task}_metrics.png"
                )
            )
        elif task == "lyrics":
            vals = {f"{k} ({v['metric'].upper()})": v["error"] for k, v in s["per_language"].items()}
            paths.append(
                plot_values(
                    vals,
                    f"{name}: error rate by language",
                    "error rate",
                    out_dir / "lyrics_error_by_language.png",
                )
            )
    return paths


# --------------------------------------------------------------------------------------------------------------
# Prediction files for the official scorers
# --------------------------------------------------------------------------------------------------------------
def _with_predictions(
    items: Sequence[EvalItem], predictions: Mapping[str, str], keys: Sequence[str]
) -> list[dict[str, Any]]:
    """The release's own records of the predicted items, unchanged, each with the prediction under ``keys``."""
    return [
        {**it.meta["record"], **dict.fromkeys(keys, predictions[it.id])}
        for it in items
        if it.id in predictions and isinstance(it.meta.get("record"), Mapping)
    ]


def _muchomusic_records(items: Sequence[EvalItem], predictions: Mapping[str, str]) -> list[dict[str, Any]]:
    """MuChoMusic's ``evaluate.py`` input: ``{id, prompt, answers, answer_orders, dataset, genre, reasoning,
    knowledge, audio_path, model_output}``, with our option order (``answers[i]`` is original option
    ``answer_orders[i]``; original option 0 is the correct one)."""
    out = []
    for it in items:
        if it.id not in predictions:
            continue
        rec = it.meta.get("record") or {}
        out.append(
            {
                "id": it.id,
                "prompt": it.prompt,
                "answers": list(it.choices),
                "answer_orders": list(it.meta["answer_orders"]),
                "dataset": rec.get("dataset"),
                "genre": rec.get("genre") or "",
                "reasoning": it.groups.get("music_reasoning")
                if isinstance(it.groups.get("music_reasoning"), list)
                else [],
                "knowledge": it.groups.get("music_knowledge")
                if isinstance(it.groups.get("music_knowledge"), list)
                else [],
                "audio_path": it.audio,
                "model_output": predictions[it.id],
            }
        )
    return out


# MMAU's evaluation.py reads "model_output" (its README says "model_prediction"); MMAR's reads
# "answer_prediction" since Feb 2026 and read "model_prediction" before. Both keys are written.
OFFICIAL_KEYS = {
    "mmau": ("model_output", "model_prediction"),
    "mmar": ("answer_prediction", "model_prediction"),
    "mmau_pro": ("model_output",),
}


def write_official_predictions(
    fmt: str, items: Sequence[EvalItem], predictions: Mapping[str, str], out_dir: str | Path
) -> list[Path]:
    """Write the predictions in the layout the benchmark's own scorer reads, if it has one: MMAU
    ``mmau_predictions.json`` (for ``evaluation.py --input``), MMAR ``mmar_predictions.json`` (read by both the
    old and the current ``code/evaluation.py``), MuChoMusic ``muchomusic_predictions.json`` (for
    ``evaluate.py --input``), MMAU-Pro ``mmau_pro_predictions.parquet`` (for
    ``evaluate_mmau_pro_comprehensive.py``). Returns the written paths (none for other formats)."""
    out_dir = Path(out_dir)
    if fmt in ("mmau", "mmar"):
        path = out_dir / f"{fmt}_predictions.json"
        write_json(path, _with_predictions(items, predictions, OFFICIAL_KEYS[fmt]))
        return [path]
    if fmt == "muchomusic":
        path = out_dir / "muchomusic_predictions.json"
        write_json(path, _muchomusic_records(items, predictions))
        return [path]
    if fmt == "mmau_pro":
        import pyarrow as pa  # MMAU-Pro's reader needed it already
        import pyarrow.parquet as pq

        path = out_dir / "mmau_pro_predictions.parquet"
        table = pa.Table.from_pylist(_with_predictions(items, predictions, OFFICIAL_KEYS[fmt]))
        replace_file(path, lambda tmp: pq.write_table(table, tmp))
        return [path]
    return []


def write_report(
    results: Mapping[str, Any],
    out_dir: str | Path,
    official: tuple[str, Sequence[EvalItem], Mapping[str, str]] | None = None,
) -> dict[str, list[str] | str]:
    """Write ``results.json``, ``results.md``, the PNGs and (``official=(format, items, predictions)``) the
    official scorer's prediction file into ``out_dir``; returns the written paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = write_plots(results, out_dir)
    files: dict[str, Any] = {
        "results_json": str(out_dir / "results.json"),
        "results_md": str(out_dir / "results.md"),
        "plots": [str(p) for p in pngs],
    }
    if official is not None:
        files["official"] = [str(p) for p in write_official_predictions(*official, out_dir)]
    write_json(out_dir / "results.json", {**results, "files": files})
    write_text(out_dir / "results.md", markdown_report({**results, "files": files}))
    return files
