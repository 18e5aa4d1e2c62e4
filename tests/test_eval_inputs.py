"""The generic JSONL / CSV benchmarks (classification, lyrics, synthetic) read the files users actually write:
raw U+2028 in JSON strings, a UTF-8 BOM, ids such as 0, the training manifests' audio object; bad offsets and
non-path audio fields fail naming file, line and field."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from tiny_assets import make_tone, write_audio

from musicflamingo.eval import BenchmarkError, build_benchmark

LABELS = ["jazz", "rock"]


def _clip(root: Path, name: str = "c.wav") -> str:
    write_audio(root / name, make_tone(440.0, 0.05))
    return name


def _jsonl(path: Path, recs: list[dict], *, prefix: str = "") -> Path:
    path.write_text(
        prefix + "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8"
    )
    return path


def _cls(root: Path, file: str = "test.jsonl") -> dict:
    return {"name": "g", "format": "classification", "root": str(root), "file": file, "labels": LABELS}


def _lyrics(root: Path) -> dict:
    return {"name": "lyr", "format": "lyrics", "root": str(root), "file": "test.jsonl"}


def _syn_mcq(audio, **extra) -> dict:
    return {
        "id": "q1",
        "task": "mcq",
        "choices": ["C major", "A minor"],
        "answer": "A minor",
        "answer_letter": "B",
        "audio": audio,
        "conversations": [{"role": "user", "content": "<sound>What key?"}],
        **extra,
    }


def test_jsonl_lines_split_only_at_newlines(tmp_path):
    # json.dumps(ensure_ascii=False) writes U+2028 / U+2029 / U+0085 raw inside strings: not line breaks
    text = "first line\u2028second\u2029third\u0085fourth"
    _jsonl(
        tmp_path / "test.jsonl",
        [{"audio": _clip(tmp_path), "lyrics": text}, {"audio": "c.wav", "lyrics": "b"}],
    )
    items = build_benchmark(_lyrics(tmp_path)).items
    assert [it.answer for it in items] == [text, "b"] and [it.id for it in items] == ["L1", "L2"]
    # CRLF files keep their line numbers
    (tmp_path / "test.jsonl").write_text(
        '{"audio": "c.wav", "lyrics": "a"}\r\n\r\n{"audio": 1', encoding="utf-8"
    )
    with pytest.raises(BenchmarkError, match=r"test.jsonl:3: not valid JSON"):
        build_benchmark(_lyrics(tmp_path))


def test_utf8_bom_jsonl_and_csv(tmp_path):
    _clip(tmp_path)
    _jsonl(tmp_path / "test.jsonl", [{"audio": "c.wav", "label": "jazz"}], prefix="\ufeff")
    assert [it.answer for it in build_benchmark(_cls(tmp_path)).items] == ["jazz"]
    with (tmp_path / "test.csv").open("w", newline="", encoding="utf-8-sig") as f:  # as Excel saves it
        csv.writer(f).writerows([["audio", "label", "offset", "duration"], ["c.wav", "rock", "1.5", ""]])
    [item] = build_benchmark(_cls(tmp_path, "test.csv")).items
    assert (item.answer, item.offset, item.duration) == ("rock", 1.5, None)


@pytest.mark.parametrize(
    ("seg", "field"),
    [
        ({"offset": "0:30"}, "offset"),
        ({"offset": -1}, "offset"),
        ({"duration": "ten"}, "duration"),
        ({"duration": [5]}, "duration"),
        ({"duration": 0}, "duration"),  # no audio at all: refused (it used to mean "the whole file")
    ],
)
def test_bad_offset_or_duration_names_file_line_field(tmp_path, seg, field):
    _clip(tmp_path)
    recs = [{"audio": "c.wav", "label": "jazz"}, {"audio": "c.wav", "label": "rock", **seg}]
    _jsonl(tmp_path / "test.jsonl", recs)
    want = rf"test.jsonl:2: field '{field}' must be seconds \(a number >"
    with pytest.raises(BenchmarkError, match=want):
        build_benchmark(_cls(tmp_path))
    _jsonl(tmp_path / "test.jsonl", [{"audio": "c.wav", "lyrics": "a", **seg}])
    with pytest.raises(BenchmarkError, match=rf"test.jsonl:1: field '{field}' must be seconds"):
        build_benchmark(_lyrics(tmp_path))
    _jsonl(tmp_path / "test.jsonl", [_syn_mcq("c.wav", **seg)])
    with pytest.raises(BenchmarkError, match=rf"test.jsonl:1: field '{field}' must be seconds"):
        build_benchmark({"name": "syn", "format": "synthetic", "root": str(tmp_path)})


def test_segments_numbers_and_absent(tmp_path):
    _clip(tmp_path)
    recs = [
        {"audio": "c.wav", "label": "jazz", "offset": 2, "duration": 3.5},
        {"audio": "c.wav", "label": "rock", "offset": None, "duration": None},
    ]
    _jsonl(tmp_path / "test.jsonl", recs)
    items = build_benchmark(_cls(tmp_path)).items
    assert [(it.offset, it.duration) for it in items] == [(2.0, 3.5), (0.0, None)]


def test_audio_object_form_and_non_path_audio(tmp_path):
    _clip(tmp_path)
    # the training manifests' {"path", "offset", "duration"}: read as the segment it names
    _jsonl(tmp_path / "test.jsonl", [_syn_mcq({"path": "c.wav", "offset": 10, "duration": 5})])
    [item] = build_benchmark({"name": "syn", "format": "synthetic", "root": str(tmp_path)}).items
    assert (item.audio, item.offset, item.duration) == (str(tmp_path / "c.wav"), 10.0, 5.0)
    _jsonl(tmp_path / "test.jsonl", [{"audio": {"path": "c.wav", "duration": 2}, "label": "jazz"}])
    [item] = build_benchmark(_cls(tmp_path)).items
    assert (item.offset, item.duration) == (0.0, 2.0)
    bad = [
        (
            [{"audio": ["c.wav", "c.wav"], "label": "jazz"}],
            r"field 'audio' must be a path string or an object",
        ),
        ([{"audio": {"file": "c.wav"}, "label": "jazz"}], r"field 'audio' has unknown keys \['file'\]"),
        ([{"audio": {"offset": 1}, "label": "jazz"}], r"field 'audio.path' must be a path string"),
        (
            [{"audio": {"path": "c.wav", "offset": "x"}, "label": "jazz"}],
            r"field 'audio.offset' must be seconds",
        ),
        (
            [{"audio": {"path": "c.wav", "offset": 1}, "offset": 2, "label": "jazz"}],
            r"'offset' is given both",
        ),
    ]
    for recs, want in bad:
        _jsonl(tmp_path / "test.jsonl", recs)
        # also with skip_missing_audio: refused, not dropped as a missing file named "{'path': ...}"
        with pytest.raises(BenchmarkError, match=r"test.jsonl:1: " + want):
            build_benchmark({**_cls(tmp_path), "skip_missing_audio": True})


def test_record_ids_zero_and_empty_are_kept(tmp_path):
    _clip(tmp_path)
    recs = [{"id": 0, "audio": "c.wav", "label": "jazz"}, {"id": 1, "audio": "c.wav", "label": "rock"}]
    _jsonl(tmp_path / "test.jsonl", recs + [{"audio": "c.wav", "label": "rock"}])
    assert [it.id for it in build_benchmark(_cls(tmp_path)).items] == ["0", "1", "L3"]
    recs = [{"id": 0, "audio": "c.wav", "lyrics": "a"}, {"id": "", "audio": "c.wav", "lyrics": "b"}]
    _jsonl(tmp_path / "test.jsonl", recs)
    assert [it.id for it in build_benchmark(_lyrics(tmp_path)).items] == ["0", ""]
