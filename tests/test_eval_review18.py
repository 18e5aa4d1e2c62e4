"""Review round 18 of the evaluation journey: Jam-ALT as its Hugging Face repository ships it since v1.2
(``metadata.jsonl`` + ``subsets/<lang>/{metadata.jsonl,audio/}``, no CSV needed) and scored with its own metrics
(alt-eval: WER, case-sensitive WER, punctuation / parenthesis / line / section-break F1) beside ours; a folder
with audio missing names the items."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from release_fixtures import make_jamendolyrics, make_mmar
from test_eval_release_formats import _bench, _run

from musicflamingo.eval import BenchmarkError

CODES = {"English": "en", "German": "de", "French": "fr", "Spanish": "es"}

# Jam-ALT-style revised transcripts: capitals, punctuation, parentheses, line and section breaks
REVISED = {
    "HILA_-_Give_Me_the_Same": "Lay awake at night,\nWondering how could I\n\nGive me the same (ooh)\n",
    "Avercage_-_Embers": "Embers in the dark,\nBurning (burning) slow\n",
    "Cafe_Jenseitz_Bebelstraße_-_kangaroo.musique": "Wir gehen heute aus,\nIn die Bebelstraße\n",
    "Capotes_à_un_Franc_-_elmanu": "Des capotes à un franc,\nPour la nuit\n",
    "10._Disparan_-_criatura": "Disparan al aire,\n¿Quién sabe por qué?\n",
}


def _songs(root: Path) -> list[dict[str, str]]:
    with (root / "JamendoLyrics.csv").open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def make_jam_alt_v12(tmp_path: Path, top: bool = True) -> Path:
    """huggingface.co/datasets/jamendolyrics/jam-alt since v1.2: subsets/<lang>/audio/<name>.mp3 with a
    subsets/<lang>/metadata.jsonl each (file_name relative to it: audio/<name>.mp3), and, with ``top``, the
    top-level metadata.jsonl of every song (file_name subsets/<lang>/audio/<name>.mp3). Rows carry name, text
    (the revised lyrics), language (a code) and fields we do not read (lines, license_type)."""
    src = make_jamendolyrics(tmp_path / "src")
    root = tmp_path / "jam-alt"
    top_rows, by_lang = [], {}
    for song in _songs(src):
        name, lang = Path(song["Filepath"]).stem, CODES[song["Language"]]
        audio = root / "subsets" / lang / "audio" / song["Filepath"]
        audio.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / "mp3" / song["Filepath"], audio)
        row = {
            "name": name,
            "text": REVISED[name],
            "language": lang,
            "license_type": song["LicenseType"],
            "lines": [{"start": 0.0, "end": 1.0, "text": REVISED[name].splitlines()[0] + "\n"}],
        }
        top_rows.append({"file_name": f"subsets/{lang}/audio/{song['Filepath']}", **row})
        by_lang.setdefault(lang, []).append({"file_name": f"audio/{song['Filepath']}", **row})
    for lang, rows in by_lang.items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (root / "subsets" / lang / "metadata.jsonl").write_text(text, encoding="utf-8")
    if top:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in top_rows)
        (root / "metadata.jsonl").write_text(text, encoding="utf-8")
    return root


def test_jam_alt_metadata_jsonl_layout_is_read(tmp_path):
    """Jam-ALT v1.2's metadata.jsonl + subsets/<lang>/ (what load_dataset and a download of the language subsets
    give: no metadata.csv, no lyrics/) was refused as "has no JamendoLyrics.csv"; a subset folder as the root
    too; benchmark.languages=[English] must keep rows whose language is the code "en"."""
    root = make_jam_alt_v12(tmp_path)
    bench = _bench("jamendolyrics", root)
    items = {it.id: it for it in bench.items}
    assert bench.source == str(root / "metadata.jsonl") and sorted(items) == sorted(REVISED)
    hila = items["HILA_-_Give_Me_the_Same"]
    assert hila.answer == REVISED["HILA_-_Give_Me_the_Same"]
    assert hila.audio == str((root / "subsets/en/audio/HILA_-_Give_Me_the_Same.mp3").resolve())
    assert {it.meta["language"] for it in items.values()} == {"en", "de", "fr", "es"}
    assert all(it.meta["scorer"] == "alt-eval" for it in items.values())
    assert [it.id for it in _bench("jamendolyrics", root, "benchmark.languages=[German]").items] == [
        "Cafe_Jenseitz_Bebelstraße_-_kangaroo.musique"
    ]
    english = _bench("jamendolyrics", root, "benchmark.languages=[English]")
    assert sorted(it.id for it in english.items) == ["Avercage_-_Embers", "HILA_-_Give_Me_the_Same"]
    # one language subset as the root
    spanish = _bench("jamendolyrics", root / "subsets" / "es")
    assert [it.id for it in spanish.items] == ["10._Disparan_-_criatura"]
    assert spanish.items[0].audio.endswith("subsets/es/audio/10._Disparan_-_criatura.mp3")
    # the language subsets alone (no top-level metadata.jsonl): every language, not the first subset found
    subsets_only = make_jam_alt_v12(tmp_path / "subsets-only", top=False)
    assert sorted(it.id for it in _bench("jamendolyrics", subsets_only).items) == sorted(REVISED)
    # a row without its text is named by file and line
    bad = root / "subsets" / "fr" / "metadata.jsonl"
    bad.write_text(json.dumps({"file_name": "audio/x.mp3", "name": "x", "language": "fr"}) + "\n")
    with pytest.raises(BenchmarkError, match=rf"{bad}:1: missing field 'text'"):
        _bench("jamendolyrics", root / "subsets" / "fr")


def test_jam_alt_full_snapshot_scores_the_metadata_jsonl_text(tmp_path):
    """A full v1.2 snapshot keeps the v1.0 metadata.csv and lyrics/ beside metadata.jsonl; load_dataset (how
    alt-eval's README scores Jam-ALT) reads metadata.jsonl, so its text is the reference, not lyrics/*.txt."""
    root = make_jam_alt_v12(tmp_path)
    shutil.copy(tmp_path / "src" / "JamendoLyrics.csv", root / "metadata.csv")
    shutil.copytree(tmp_path / "src" / "lyrics", root / "lyrics")  # older text
    (root / "audio").mkdir()
    bench = _bench("jamendolyrics", root)
    assert bench.source == str(root / "metadata.jsonl")
    assert {it.id: it.answer for it in bench.items} == REVISED
    # benchmark.file=metadata.csv still reads the CSV and lyrics/
    csv_bench = _bench("jamendolyrics", root, "benchmark.file=metadata.csv")
    assert csv_bench.source == str(root / "metadata.csv")
    assert csv_bench.items[0].answer == (tmp_path / "src/lyrics/HILA_-_Give_Me_the_Same.txt").read_text()


def test_jam_alt_metadata_jsonl_missing_audio_names_item_and_path(tmp_path):
    """A Jam-ALT song whose audio is absent is named (id and the path its metadata.jsonl row gives), not a
    GitHub-layout mp3/ path it never had."""
    root = make_jam_alt_v12(tmp_path)
    gone = root / "subsets" / "de" / "audio" / "Cafe_Jenseitz_Bebelstraße_-_kangaroo.musique.mp3"
    gone.unlink()
    with pytest.raises(
        BenchmarkError,
        match=r"1 of 5 audio files not found \(e\.g\. item 'Cafe_Jenseitz_Bebelstraße_-_kangaroo\.musique': "
        + rf"{gone.resolve()}\)",
    ):
        _bench("jamendolyrics", root)


def test_missing_audio_error_names_the_items(tmp_path):
    """'2 of 5 audio files not found (e.g. /path/a.wav, /path/b.wav)' named paths only: the items (ids a
    results or predictions file holds) are named beside them."""
    root = make_mmar(tmp_path / "mmar")
    items = _bench("mmar", root).items
    for it in items[1:3]:
        Path(it.audio).unlink()
    with pytest.raises(BenchmarkError) as info:
        _bench("mmar", root)
    msg = str(info.value)
    assert msg.startswith("benchmark mmar: 2 of 5 audio files not found (e.g. ")
    for it in items[1:3]:
        assert f"item {it.id!r}: {it.audio}" in msg


def _jam_alt_predictions(names: list[str]) -> dict[str, str]:
    """Answers with the errors alt-eval's metrics count: lowercase, lost punctuation, parentheses and breaks."""
    preds = {}
    for i, name in enumerate(names):
        ref = REVISED[name]
        if i % 3 == 0:
            preds[name] = ref.lower().replace(",", "")
        elif i % 3 == 1:
            preds[name] = ref.replace("\n", " ").replace("(", "").replace(")", "")
        else:
            preds[name] = ref
    return preds


def test_jam_alt_is_scored_with_alt_eval_beside_our_wer(tmp_path):
    """Jam-ALT's published numbers come from alt-eval (WER with its own tokenisation, case-sensitive WER, and
    precision/recall/F1 of punctuation, parentheses, line and section breaks): none of them was computed, so
    a Jam-ALT run could not be compared with the paper. They are now in results.json (overall and per language)
    and results.md, equal to alt_eval.compute_metrics on the same texts; JamendoLyrics' own (normalised) lyrics
    are not scored with them."""
    alt_eval = pytest.importorskip("alt_eval")
    root = make_jam_alt_v12(tmp_path)
    names = [it.id for it in _bench("jamendolyrics", root).items]
    preds = _jam_alt_predictions(names)
    results = _run("jamendolyrics", root, preds)
    lyrics = results["tasks"]["lyrics"]
    langs = {it.id: it.meta["language"] for it in _bench("jamendolyrics", root).items}
    want = alt_eval.compute_metrics(
        [REVISED[n] for n in names], [preds[n] for n in names], languages=[langs[n] for n in names]
    )
    got = lyrics["alt_eval"]
    assert got["n"] == 5
    for key in ("WER", "WER_case", "F1_punc", "F1_pare", "F1_line", "F1_sect", "P_line", "R_line"):
        assert got[key] == pytest.approx(want[key]), key
    assert got["WER_case"] > got["WER"] and got["F1_line"] < 1.0  # the errors above are counted
    german = [n for n in names if langs[n] == "de"]
    want_de = alt_eval.compute_metrics(
        [REVISED[n] for n in german], [preds[n] for n in german], languages="de"
    )
    assert got["per_language"]["de"]["n"] == 1
    assert got["per_language"]["de"]["WER_case"] == pytest.approx(want_de["WER_case"])
    # no parenthesis in the German song: alt-eval's NaN is null in results.json
    assert got["per_language"]["de"]["F1_pare"] is None
    saved = json.loads((root / "out" / "results.json").read_text())
    assert saved["tasks"]["lyrics"]["alt_eval"]["F1_sect"] == pytest.approx(want["F1_sect"])
    report = (root / "out" / "results.md").read_text()
    assert "### Jam-ALT metrics (alt-eval, 5 items)" in report
    assert f"| all | 5 | {100 * want['WER']:.2f}% | {100 * want['WER_case']:.2f}% |" in report
    # our WER (normalised: case and punctuation away) is still the summary's wer
    assert lyrics["wer"] is not None and lyrics["n_wer"] == 5
    # Jam-ALT's older layout (metadata.csv + audio/ + lyrics/): the same numbers
    old = tmp_path / "jam-alt-v1"
    shutil.copytree(root / "subsets" / "en" / "audio", old / "audio")
    for lang in ("de", "fr", "es"):
        shutil.copytree(root / "subsets" / lang / "audio", old / "audio", dirs_exist_ok=True)
    (old / "lyrics").mkdir()
    for n in names:
        (old / "lyrics" / f"{n}.txt").write_text(REVISED[n], encoding="utf-8")
    shutil.copy(tmp_path / "src" / "JamendoLyrics.csv", old / "metadata.csv")
    old_results = _run("jamendolyrics", old, preds)["tasks"]["lyrics"]["alt_eval"]
    assert old_results["WER_case"] == pytest.approx(want["WER_case"])
    assert old_results["F1_line"] == pytest.approx(want["F1_line"])
    # JamendoLyrics' CSV release: no alt-eval block
    plain = make_jamendolyrics(tmp_path / "jamendolyrics")
    plain_items = _bench("jamendolyrics", plain).items
    plain_results = _run("jamendolyrics", plain, {it.id: it.answer for it in plain_items})
    assert "alt_eval" not in plain_results["tasks"]["lyrics"]


def test_jam_alt_without_alt_eval_says_so(tmp_path, monkeypatch):
    """Without the alt-eval package a Jam-ALT run still scores our WER and says its own metrics are missing."""
    import sys

    monkeypatch.setitem(sys.modules, "alt_eval", None)  # import alt_eval raises ImportError
    root = make_jam_alt_v12(tmp_path)
    names = [it.id for it in _bench("jamendolyrics", root).items]
    results = _run("jamendolyrics", root, {n: REVISED[n] for n in names})
    lyrics = results["tasks"]["lyrics"]
    assert lyrics["wer"] == 0.0
    assert "alt-eval is not installed" in lyrics["alt_eval"]["error"]
    assert "alt-eval is not installed" in (root / "out" / "results.md").read_text()


def test_benchmark_limit_points_at_eval_limit(tmp_path):
    """+benchmark.limit=2 (a resume "with another benchmark.limit") was refused as an unknown benchmark setting
    with a spelling guess (benchmark.file); it names eval.py's own limit=."""
    root = make_mmar(tmp_path / "mmar")
    with pytest.raises(
        BenchmarkError, match=r"benchmark\.limit: .*did you mean limit=\.\.\., a setting of eval\.py"
    ):
        _bench("mmar", root, "+benchmark.limit=2")


def test_jam_alt_csv_run_resumes_after_metadata_jsonl_is_added(tmp_path):
    """A Jam-ALT run begun on the v1.0 `metadata.csv`, resumed once the v1.2 `metadata.jsonl` sits beside it
    (read in preference since d051ebc): refused "differs in: data_file" although songs, ids and prompts are the
    same, so every song was asked again in a new folder. Now the finished songs are reused."""
    from test_eval_release_formats import _cfg

    from musicflamingo.eval import evaluate

    v12 = make_jam_alt_v12(tmp_path)
    old = tmp_path / "jam"
    for lang in ("en", "de", "fr", "es"):
        shutil.copytree(v12 / "subsets" / lang / "audio", old / "audio", dirs_exist_ok=True)
    (old / "lyrics").mkdir()
    for name, text in REVISED.items():
        (old / "lyrics" / f"{name}.txt").write_text(text, encoding="utf-8")
    shutil.copy(tmp_path / "src" / "JamendoLyrics.csv", old / "metadata.csv")
    asked = []

    def predict(batch):
        asked.extend(it.id for it in batch)
        return [REVISED[it.id] for it in batch]

    evaluate(_cfg("jamendolyrics", old, tmp_path / "out", "limit=3"), predict_fn=predict)
    first = list(asked)
    asked.clear()
    shutil.copytree(v12 / "subsets", old / "subsets")
    shutil.copy(v12 / "metadata.jsonl", old / "metadata.jsonl")
    results = evaluate(_cfg("jamendolyrics", old, tmp_path / "out"), predict_fn=predict)
    assert len(first) == 3 and not set(first) & set(asked) and len(asked) == len(REVISED) - 3
    assert json.loads((tmp_path / "out" / "run.json").read_text())["data_file"] == "metadata.jsonl"
    assert results["tasks"]["lyrics"]["alt_eval"]["n"] == len(REVISED)  # every song scored, the newer text
