"""Review round 17 of the evaluation journey: benchmarks downloaded exactly as their authors ship them, Hugging Face
dataset repositories included (JamendoLyrics' subsets/<lang>/mp3/, Jam-ALT's metadata.csv + audio/), and the
MUSDB18 lyrics extension's line types (type d spans have no vocals)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from release_fixtures import DATA, make_jamendolyrics, make_musdb18_lyrics
from test_eval_release_formats import _bench, _cfg
from tiny_assets import make_tone, write_audio

from musicflamingo.audio.io import load_audio
from musicflamingo.eval import BenchmarkError, evaluate

CODES = {"English": "en", "German": "de", "French": "fr", "Spanish": "es"}


def _songs(root: Path, table: str = "JamendoLyrics.csv") -> list[dict[str, str]]:
    with (root / table).open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_jamendolyrics_hugging_face_copy_reads_subsets_lang_mp3(tmp_path):
    """huggingface.co/datasets/jamendolyrics/jamendolyrics keeps the audio in subsets/<lang>/mp3/<Filepath> (next to
    the same JamendoLyrics.csv and lyrics/): every song was reported as missing audio."""
    root = make_jamendolyrics(tmp_path / "jamendolyrics")
    for row in _songs(root):
        dest = root / "subsets" / CODES[row["Language"]] / "mp3" / row["Filepath"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(root / "mp3" / row["Filepath"], dest)
    shutil.rmtree(root / "mp3")
    items = {it.id: it for it in _bench("jamendolyrics", root).items}
    assert len(items) == 5
    assert items["Avercage_-_Embers"].audio == str(root / "subsets" / "en" / "mp3" / "Avercage_-_Embers.mp3")
    assert items["10._Disparan_-_criatura"].audio.endswith("subsets/es/mp3/10._Disparan_-_criatura.mp3")
    # a song whose audio is nowhere is still reported at the GitHub path the layout names
    (root / "subsets" / "en" / "mp3" / "Avercage_-_Embers.mp3").unlink()
    with pytest.raises(
        BenchmarkError, match=r"1 of 5 audio files not found \(e\.g\. .*/mp3/Avercage_-_Embers"
    ):
        _bench("jamendolyrics", root)


def test_jam_alt_hugging_face_layout_is_read_by_the_jamendolyrics_reader(tmp_path):
    """huggingface.co/datasets/jamendolyrics/jam-alt: metadata.csv (JamendoLyrics.csv's columns, licences starting
    with "CC") + audio/<Filepath> + lyrics/<name>.txt (the revised transcripts): it was refused as "has no
    JamendoLyrics.csv"."""
    src = make_jamendolyrics(tmp_path / "src")
    root = tmp_path / "jam-alt"
    (root / "audio").mkdir(parents=True)
    shutil.copytree(src / "lyrics", root / "lyrics")
    rows = _songs(src)
    with (root / "metadata.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            if not row["LicenseType"].startswith("CC"):
                row["LicenseType"] = "CC " + row["LicenseType"]
            writer.writerow(row)
            shutil.copy(src / "mp3" / row["Filepath"], root / "audio" / row["Filepath"])
    revised = "Give me the same,\nGive me the same (ooh)\n"
    (root / "lyrics" / "HILA_-_Give_Me_the_Same.txt").write_text(revised, encoding="utf-8")
    bench = _bench("jamendolyrics", root)
    items = {it.id: it for it in bench.items}
    assert bench.source == str(root / "metadata.csv") and len(items) == 5
    assert items["HILA_-_Give_Me_the_Same"].answer == revised
    assert items["HILA_-_Give_Me_the_Same"].audio == str(root / "audio" / "HILA_-_Give_Me_the_Same.mp3")
    assert {it.meta["language"] for it in items.values()} == {"en", "de", "fr", "es"}
    german = _bench("jamendolyrics", root, "benchmark.languages=[de]")
    assert [it.id for it in german.items] == ["Cafe_Jenseitz_Bebelstraße_-_kangaroo.musique"]


def _track(root: Path, name: str, text: str) -> Path:
    path = root / "test" / f"{name}.txt"
    path.write_text(text, encoding="utf-8")
    write_audio(root / "test" / name / "mixture.wav", make_tone(220.0, 30.0, sr=4000), sr=4000)
    return path


def test_musdb18_type_d_spans_have_no_vocals(tmp_path):
    """The extension's own preprocessing maps type d to its "no vocals in snippet" label (plla-tisvs: a->n, b->s,
    c->d, d->x; x = text replaced by a lone space token). A d span without text stopped the whole benchmark
    ("expected 'MM:SS MM:SS <type> <text>'"), and a d span's text was scored as lyrics the song does not sing."""
    root = make_musdb18_lyrics(tmp_path / "musdb")
    name = "Ben Carrigan - We'll Talk About It All Tonight"
    _track(
        root,
        name,
        "00:00 00:08 d\n"
        "00:08 00:12 a we'll talk about it all tonight\n"
        "00:12 00:16 d instrumental break\n"
        "00:16 00:20 c you and me\n",
    )
    bench = _bench("musdb18_lyrics", root)
    songs = {it.id: it for it in bench.items}
    assert songs[name].answer == "we'll talk about it all tonight\nyou and me"
    assert bench.skipped == {"rejected line (*)": 1, "no vocals (type d)": 2}
    lines = {it.id: it for it in _bench("musdb18_lyrics", root, "benchmark.unit=line").items}
    assert sorted(k for k in lines if k.startswith(name)) == [f"{name}#2", f"{name}#4"]
    assert (
        lines[f"{name}#4"].offset,
        lines[f"{name}#4"].duration,
        lines[f"{name}#4"].groups["line_type"],
    ) == (
        16.0,
        4.0,
        "c",
    )


def test_musdb18_unknown_line_type_is_named(tmp_path):
    """A type outside a-d (a shifted column, a typo) was taken as a line type and its text scored."""
    root = make_musdb18_lyrics(tmp_path / "musdb")
    path = _track(root, "BKS - Bulldozer", "00:01 00:05 a go go go\n00:05 00:09 e not a type\n")
    with pytest.raises(
        BenchmarkError, match=rf"{path}:2: expected 'MM:SS MM:SS <type> <text>' with type one of a"
    ):
        _bench("musdb18_lyrics", root)
    path.write_text("00:01 00:05 a go go go\n00:05 00:09 b\n", encoding="utf-8")
    with pytest.raises(BenchmarkError, match=rf"{path}:2: a type 'b' line needs its text"):
        _bench("musdb18_lyrics", root)


# ---- MMAU test-mini, Hugging Face copy (gamma-lab-umd/MMAU-test-mini) ----------------------------------------------
def make_mmau_hf(root: Path, tmp: Path, split: str | None = None) -> list[dict]:
    """data/test-00000-of-00001.parquet in the Hugging Face copy's schema, from the 6 real rows of
    tests/release_data/mmau: ``instruction``, ``choices`` / ``answer`` written "(A) Man", the audio file's bytes in
    ``context`` ({bytes, path: None}), the other fields in the JSON string ``other_attributes`` (one row's category a
    one-element list, as 13 rows of the release; one row's audio an MP3 stream, as 46 rows)."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = json.loads((DATA / "mmau" / "mmau-test-mini.json").read_text(encoding="utf-8"))
    table = []
    for k, rec in enumerate(rows):
        clip = write_audio(
            tmp / f"clip{k}.{'mp3' if k == 1 else 'wav'}", make_tone(300.0 + 50 * k, 0.2), sr=16000
        )
        attrs = {
            key: rec[key]
            for key in ("id", "dataset", "task", "split", "category", "sub-category", "difficulty")
        }
        attrs["category"] = [rec["category"]] if k == 2 else rec["category"]
        if split:
            attrs["split"] = split
        letters = [f"({chr(65 + i)}) {c}" for i, c in enumerate(rec["choices"])]
        table.append(
            {
                "context": {"bytes": clip.read_bytes(), "path": None},
                "instruction": rec["question"],
                "choices": letters,
                "answer": letters[rec["choices"].index(rec["answer"])],
                "other_attributes": json.dumps(attrs),
            }
        )
    (root / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(table), root / "data" / "test-00000-of-00001.parquet")
    return rows


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_mmau_hugging_face_parquet_is_read_with_its_audio_outside_the_benchmark_folder(tmp_path, monkeypatch):
    """The Hugging Face copy of MMAU test-mini was refused ("has no mmau-test-mini.json"). Its rows read as the
    GitHub JSON's (letters stripped from choices and answer, fields unpacked from other_attributes), its audio
    written once to the cache (never under benchmark.root), and the official scorer's file holds no audio bytes."""
    root = tmp_path / "MMAU-test-mini"
    rows = make_mmau_hf(root, tmp_path / "clips")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    before = _files(root)
    bench = _bench("mmau", root)
    items = {it.id: it for it in bench.items}
    assert _files(root) == before
    assert list(items) == [r["id"] for r in rows] and bench.source.endswith(
        "data/test-00000-of-00001.parquet"
    )
    for rec in rows:
        it = items[rec["id"]]
        assert it.choices == rec["choices"] and it.answer == rec["answer"]
        assert it.choices[it.answer_index] == rec["answer"] and it.groups["category"] == rec["category"]
        assert it.audio.startswith(str(tmp_path / "xdg" / "musicflamingo" / "embedded_audio"))
        assert it.meta["record"] == {k: v for k, v in rec.items() if k != "audio_id"}
    assert items[rows[1]["id"]].audio.endswith(".mp3") and items[rows[0]["id"]].audio.endswith(".wav")
    assert len(load_audio(items[rows[1]["id"]].audio)) > 0
    music = _bench("mmau", root, "benchmark.tasks=[music]", f"benchmark.audio_cache={tmp_path / 'cache'}")
    assert {it.groups["task"] for it in music.items} == {"music"}
    assert all(it.audio.startswith(str(tmp_path / "cache")) for it in music.items)
    assert len(list((tmp_path / "cache").rglob("*.*"))) == len(music.items) < len(rows)  # only the rows kept

    answers = {it.id: f"({chr(65 + it.answer_index)}) {it.answer}" for it in bench.items}
    out = tmp_path / "out"
    results = evaluate(_cfg("mmau", root, out), predict_fn=lambda batch: [answers[it.id] for it in batch])
    assert results["tasks"]["mcq"]["accuracy"] == 1.0
    official = json.loads((out / "mmau_predictions.json").read_text(encoding="utf-8"))
    assert [r["id"] for r in official] == [r["id"] for r in rows] and "context" not in official[0]
    assert (
        official[0]["choices"] == rows[0]["choices"] and official[0]["model_output"] == answers[rows[0]["id"]]
    )
    assert _files(root) == before


def test_mmau_hugging_face_parquet_of_the_other_split_is_refused(tmp_path):
    """MMAU-test (answers withheld) ships under the same shard names: read as test-mini, it would be scored as
    test-mini (every item an unanswerable row)."""
    root = tmp_path / "MMAU-test"
    make_mmau_hf(root, tmp_path / "clips", split="test")
    with pytest.raises(
        BenchmarkError,
        match=r"test-00000-of-00001\.parquet row 1: a row of the release's 'test' split, "
        r"but benchmark.split='test-mini': pass benchmark.split=test",
    ):
        _bench("mmau", root, f"benchmark.audio_cache={tmp_path / 'cache'}")
