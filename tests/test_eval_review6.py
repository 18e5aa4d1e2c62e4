"""Review round 6 of the evaluation journey: release CSVs located and read as written (multi-line cells, unquoted
commas, non-UTF-8 files), filters and settings given the way the command line gives them (a single value, a
misspelt key), Music Instruct's split, and a damaged run.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from release_fixtures import (
    make_gtzan,
    make_jamendolyrics,
    make_mmau,
    make_muchomusic,
    make_music_instruct,
    make_musiccaps,
    tone,
)
from test_eval_release_formats import _bench
from test_eval_release_formats import _cfg as release_cfg

from musicflamingo.eval import BenchmarkError, EvalConfigError, build_benchmark, evaluate, run_benchmark

REPO = Path(__file__).resolve().parents[1]


def _cfg(name: str, root: Path, *extra: str):
    return release_cfg(name, root, root / "out", *extra)


def test_csv_error_names_the_line_the_row_starts_on(tmp_path):
    """MusicCaps captions hold line breaks: the 5th row (JC41M7RPSec) starts on line 7 of the file, not line 6."""
    root = make_musiccaps(tmp_path / "mc")
    csv_path = root / "musiccaps-public.csv"
    raw = csv_path.read_bytes()
    assert raw.split(b"\r\n")[6].startswith(b"JC41M7RPSec,0,10,")  # line 7 (1-based)
    csv_path.write_bytes(raw.replace(b"JC41M7RPSec,0,10,", b"JC41M7RPSec,zero,10,"))
    with pytest.raises(BenchmarkError, match=r"musiccaps-public\.csv:7: start_s/end_s must be numbers"):
        _bench("musiccaps", root)


def test_csv_row_with_more_cells_than_columns_is_refused(tmp_path):
    """An unquoted comma shifts the row's values under the wrong columns: the reference would be "hello" and the
    language " world" without a word. Refused, naming the line."""
    tone(tmp_path / "s.wav")
    (tmp_path / "test.csv").write_text(
        "audio,lyrics,language\ns.wav,la la,en\ns.wav,hello, world,en\n", encoding="utf-8"
    )
    with pytest.raises(BenchmarkError, match=r"test\.csv:3: 4 cells, but the header has 3 columns"):
        _bench("lyrics", tmp_path, "benchmark.file=test.csv")


def test_csv_short_row_names_the_missing_field(tmp_path):
    """A row with fewer cells than columns: the missing cells are absent fields (error names line and field)."""
    tone(tmp_path / "s.wav")
    (tmp_path / "test.csv").write_text("language,audio,lyrics\nen,s.wav\n", encoding="utf-8")
    with pytest.raises(BenchmarkError, match=r"test\.csv:2: missing field 'lyrics'"):
        _bench("lyrics", tmp_path, "benchmark.file=test.csv")


def test_non_utf8_csv_is_one_clear_error(tmp_path):
    """Excel on Windows saves CSV in its code page: a bad-input error naming the file, not a UnicodeDecodeError."""
    tone(tmp_path / "s.wav")
    (tmp_path / "test.csv").write_bytes("audio,lyrics\ns.wav,caf\xe9 au lait\n".encode("cp1252"))
    with pytest.raises(BenchmarkError, match=r"test\.csv: not UTF-8 text .*save the file as UTF-8"):
        _bench("lyrics", tmp_path, "benchmark.file=test.csv")


def test_a_single_filter_value_without_brackets(tmp_path):
    """`benchmark.tasks=music` (Hydra gives a string) keeps the music questions, as `tasks=[music]` does; it was
    split into the letters m, u, s, i, c."""
    root = make_mmau(tmp_path / "mmau")
    listed = [it.id for it in _bench("mmau", root, "benchmark.tasks=[music]").items]
    single = [it.id for it in _bench("mmau", root, "benchmark.tasks=music").items]
    assert listed and single == listed


def test_a_setting_the_benchmark_does_not_read_is_refused(tmp_path):
    """`+benchmark.task=[music]` (for `tasks`) was accepted and ignored: every task scored without a word."""
    root = make_mmau(tmp_path / "mmau")
    with pytest.raises(BenchmarkError, match=r"benchmark\.task: .*did you mean benchmark\.tasks\?"):
        _bench("mmau", root, "+benchmark.task=[music]")
    # MMAR filters on modalities; MMAU's tasks is no setting of it
    with pytest.raises(BenchmarkError, match=r"benchmark\.tasks: benchmark mmar \(format mmar\) has no such"):
        build_benchmark({"name": "mmar", "format": "mmar", "root": str(root), "tasks": ["music"]})
    # the documented use of a classification config with a JSONL of yours keeps the config's own keys
    tone(tmp_path / "cls" / "a.wav")
    (tmp_path / "cls" / "test.jsonl").write_text('{"audio": "a.wav", "label": "jazz"}\n', encoding="utf-8")
    items = _bench(
        "gtzan", tmp_path / "cls", "benchmark.format=classification", "+benchmark.file=test.jsonl"
    ).items
    assert [it.answer for it in items] == ["jazz"]


def test_music_instruct_split_is_test_or_train(tmp_path):
    """Any split but "test" was read as the train split (`split=tset` scored the training pairs); a string
    "False" in is_audioset_eval counted as true."""
    root = make_music_instruct(tmp_path / "mi")
    with pytest.raises(BenchmarkError, match=r"benchmark\.split must be test or train .*'tset'"):
        _bench("music_instruct", root, "benchmark.split=tset")
    path = root / "MusicInstruct" / "music_instruct.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    expected = sorted(r["ytid"] for r in data["QA"] if r["is_audioset_eval"])
    for r in data["QA"]:
        r["is_audioset_eval"] = str(r["is_audioset_eval"])  # "True" / "False"
    path.write_text(json.dumps(data), encoding="utf-8")
    assert sorted(it.id.split(":")[0] for it in _bench("music_instruct", root).items) == expected


def _answer_all(batch):
    return ["(A)" for _ in batch]


def test_damaged_run_json_is_one_clear_error(tmp_path):
    """A run.json cut short (a disk that filled up) beside predictions: an error naming it and what to do, not a
    JSONDecodeError traceback; the predictions stay."""
    root = make_mmau(tmp_path / "mmau")
    out = root / "out"
    evaluate(_cfg("mmau", root, "limit=2"), predict_fn=_answer_all)
    before = (out / "predictions.jsonl").read_text(encoding="utf-8")
    (out / "run.json").write_text('{"benchmark": "mm', encoding="utf-8")
    with pytest.raises(
        EvalConfigError, match=r"run\.json: not the JSON object of settings .*delete it to resume"
    ):
        evaluate(_cfg("mmau", root), predict_fn=_answer_all)
    assert (out / "predictions.jsonl").read_text(encoding="utf-8") == before
    (out / "run.json").unlink()  # as the message says: resumes, and records the settings again
    assert evaluate(_cfg("mmau", root), predict_fn=_answer_all)["num_predicted"] == 6
    assert json.loads((out / "run.json").read_text(encoding="utf-8"))["benchmark"] == "mmau"


def test_a_utf8_bom_is_not_part_of_the_text(tmp_path):
    """A lyrics file or split list saved with a BOM (Windows editors): the BOM stuck to the first word (one more
    word error per song, silently) or to the first clip's genre (an error about a label "\ufeffblues")."""
    root = make_jamendolyrics(tmp_path / "jl")
    name = "Avercage_-_Embers"
    lyrics = root / "lyrics" / f"{name}.txt"
    text = lyrics.read_text(encoding="utf-8")
    lyrics.write_text("\ufeff" + text, encoding="utf-8")
    [item] = [it for it in _bench("jamendolyrics", root).items if it.id == name]
    assert item.answer == text
    results = run_benchmark([item], lambda b: [text], tmp_path / "out", progress=False)
    assert results["tasks"]["lyrics"]["wer"] == 0.0
    gtzan = make_gtzan(tmp_path / "gtzan")
    split = gtzan / "test_filtered.txt"
    split.write_text("\ufeff" + split.read_text(encoding="utf-8"), encoding="utf-8")
    assert len(_bench("gtzan", gtzan, "benchmark.split=test_filtered.txt").items) == 10


def test_a_seed_that_is_no_integer_names_the_setting(tmp_path):
    """`benchmark.seed=abc` (MuChoMusic's option shuffle): was a bare "invalid literal for int()"."""
    root = make_muchomusic(tmp_path / "mc")
    with pytest.raises(BenchmarkError, match=r"benchmark\.seed='abc': expected an integer"):
        _bench("muchomusic", root, "benchmark.seed=abc")
