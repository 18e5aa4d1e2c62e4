"""Each benchmark read from a folder laid out exactly as its authors release it (tests/release_fixtures.py: rows
taken from the public releases, generated audio at the paths they name): every item is read with the right
question, options, answer or reference and id; a known prediction file scores to a known number; the prediction
files written for the official scorers give the same numbers when read the way those scripts read them."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from release_fixtures import (
    DATA,
    make_gtzan,
    make_jamendolyrics,
    make_medley_solos,
    make_mmar,
    make_mmau,
    make_mmau_pro,
    make_muchomusic,
    make_musdb18_lyrics,
    make_music_avqa,
    make_music_instruct,
    make_musiccaps,
    make_nsynth,
    make_opencpop,
    tone,
)

from musicflamingo.eval import BenchmarkError, EvalConfigError, build_benchmark, evaluate, normalize_lyrics
from musicflamingo.eval.parsing import option_letter
from musicflamingo.eval.report import PAPER_RESULTS, paper_comparison

REPO = Path(__file__).resolve().parents[1]


def _cfg(name: str, root: Path, out: Path, *extra: str):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(
            config_name="eval",
            overrides=[
                f"benchmark={name}",
                f"benchmark.root={root}",
                f"output_dir={out}",
                "progress=false",
                *extra,
            ],
        )


def _bench(name: str, root: Path, *extra: str):
    return build_benchmark(dict(_cfg(name, root, root / "out", *extra).benchmark))


def _run(name: str, root: Path, answers: dict[str, str], *extra: str) -> dict:
    """evaluate() with the predictions in ``answers`` (id -> text); every item must have one."""

    def predict(batch):
        return [answers[it.id] for it in batch]

    return evaluate(_cfg(name, root, root / "out", *extra), predict_fn=predict)


def _say(item, index: int) -> str:
    return f"({option_letter(index)}) {item.choices[index]}"


# ---- official scorers' reading rules, re-implemented here (not imported from the package) ---------------------
def _official_string_match(answer: str, prediction: str, choices: list[str]) -> bool:
    """string_match() of MMAU's evaluation.py (and MMAR's code/evaluation.py): word-token sets."""

    def tokenize(text):
        return set(re.findall(r"\b\w+\b", text.lower()))

    pred, ans = tokenize(prediction), tokenize(answer)
    if not pred:
        return False
    wrong = set()
    for c in choices:
        if tokenize(c) != ans:
            wrong |= tokenize(c) - ans
    return ans.issubset(pred) and pred.isdisjoint(wrong)


def _official_accuracy(path: Path, output_key: str, group_key: str) -> tuple[float, dict[str, float]]:
    """Total and per-``group_key`` accuracy as MMAU's / MMAR's evaluation.py compute them from ``path``: JSON
    (``json.load``) or JSONL by suffix, rows without ``output_key`` skipped, fields read by name."""
    text = path.read_text(encoding="utf-8")
    data = json.loads(text) if path.name.endswith("json") else [json.loads(x) for x in text.splitlines()]
    corr = total = 0
    groups: dict[str, list[int]] = {}
    for sample in data:
        if output_key not in sample:
            continue
        ok = _official_string_match(sample["answer"], sample[output_key], sample["choices"])
        corr, total = corr + ok, total + 1
        g = groups.setdefault(sample[group_key], [0, 0])
        g[0], g[1] = g[0] + ok, g[1] + 1
    return corr / total, {k: c / n for k, (c, n) in groups.items()}


def _official_muchomusic(path: Path) -> float:
    """MuChoMusic's evaluate.py: dict of lists, extract_responses (one capital A-D character, else the first
    option contained in the output), compare_answers against answer_orders.index(0)."""
    eval_json = json.loads(path.read_text(encoding="utf-8"))
    eval_json = {k: [d[k] for d in eval_json] for k in eval_json[0]}
    responses = []
    for output, options in zip(eval_json["model_output"], eval_json["answers"]):
        output = output.split("The correct answer is:")[-1].strip()
        found = list({"A", "B", "C", "D"}.intersection(output))
        if len(found) == 1:
            responses.append(["A", "B", "C", "D"].index(found[0]))
            continue
        for j, answer in enumerate(a.lower().strip() for a in options):
            if answer in output.lower().strip():
                responses.append(j)
                break
        else:
            responses.append(-1)
    right = sum(r == order.index(0) for r, order in zip(responses, eval_json["answer_orders"]))
    return right / len(responses)


# ---- MMAU ------------------------------------------------------------------------------------------------------
def test_mmau_release_repeated_options_and_official_file(tmp_path):
    root = make_mmau(tmp_path / "MMAU")
    bench = _bench("mmau", root)
    items = {it.id[:8]: it for it in bench.items}
    assert len(items) == 6 and bench.rows == 6 and bench.skipped == {}
    dup = items["e277d88f"]
    assert dup.correct_indices == [0, 3] and "(D) 1.63 seconds" in dup.prompt
    assert items["dd249c7f"].correct_indices == [1]  # a repeated *distractor* changes nothing
    assert Path(dup.audio) == root / "test-mini-audios" / f"{dup.id}.wav"
    assert dup.groups == {"task": "music", "category": "Reasoning", "sub-category": "Temporal Reasoning",
                          "difficulty": "hard"}  # fmt: skip

    answers = {
        items["3fe64f3d"].id: "(A) Man",  # right, both rules
        dup.id: "(D) 1.63 seconds",  # the answer's text under its second letter: right, both rules
        items["dd249c7f"].id: "(C) fourteen",  # wrong
        items["2a2f9c14"].id: "B",  # wrong letter
        items["7a0376a4"].id: "The answer is B",  # letter rule right; MMAU rule needs the text: wrong
        items["91eb5cf6"].id: "one",  # text of option D: right, both rules
    }
    results = _run("mmau", root, answers)
    s = results["tasks"]["mcq"]
    assert s["accuracy"] == pytest.approx(4 / 6) and s["accuracy_mmau"] == pytest.approx(3 / 6)
    assert s["repeated_answer"] == 1 and s["answer_not_in_choices"] == 0
    music = s["by"]["task"]["music"]
    assert (
        music["n"] == 3
        and music["accuracy"] == pytest.approx(2 / 3)
        and music["accuracy_mmau"] == pytest.approx(1 / 3)
    )

    # The official scorer reads model_output from mmau_predictions.json: the same numbers as our MMAU rule.
    path = tmp_path / "MMAU" / "out" / "mmau_predictions.json"
    assert results["files"]["official"] == [str(path)]
    total, by_task = _official_accuracy(path, "model_output", "task")
    assert total == pytest.approx(s["accuracy_mmau"]) and by_task["music"] == pytest.approx(
        music["accuracy_mmau"]
    )
    rows = json.loads(path.read_text())
    release = json.loads((root / "mmau-test-mini.json").read_text())
    assert [
        {k: v for k, v in r.items() if k not in ("model_output", "model_prediction")} for r in rows
    ] == release

    report = (tmp_path / "MMAU" / "out" / "results.md").read_text()
    assert "| MMAU-Music (test-mini) | accuracy | 76.35 | 66.67 | 33.33 | 3 |" in report
    assert "mmau_predictions.json" in report


def test_mmau_test_split_answers_withheld(tmp_path):
    root = tmp_path / "MMAU"
    rows = json.loads((DATA / "mmau" / "mmau-test-mini.json").read_text())
    for r in rows:
        del r["answer"]
        r["audio_id"] = r["audio_id"].replace("test-mini-audios", "test-audios")
        tone(root / r["audio_id"])
    (root / "mmau-test.json").write_text(json.dumps(rows, indent=2))
    results = _run("mmau", root, {r["id"]: "(A) x" for r in rows}, "benchmark.split=test")
    s = results["tasks"]["mcq"]
    assert s["withheld"] == 6 and s["n"] == 0 and s["accuracy"] is None
    assert (results["num_predicted"], results["num_scored"], results["num_withheld"]) == (6, 0, 6)
    report = (root / "out" / "results.md").read_text()
    assert (
        "- items predicted: 6 of 6\n- items scored: 0, answers withheld (predicted, not scored): 6\n"
        in report
    )
    written = json.loads((root / "out" / "mmau_predictions.json").read_text())
    assert len(written) == 6 and all(r["model_output"] == "(A) x" for r in written)
    paper = paper_comparison(results)
    assert [(p["label"], p["paper"], p["ours"]) for p in paper] == [("MMAU-Music (test)", 76.83, None)]
    with pytest.raises(
        BenchmarkError, match=r"mmau-test-mini.json record 1 \(id [0-9a-f-]+\): missing field 'answer'"
    ):
        (root / "mmau-test-mini.json").write_text(json.dumps(rows))
        _bench("mmau", root)


# ---- MMAR ------------------------------------------------------------------------------------------------------
MMAR_ANSWERS = {
    "qx8hrhBZJ98_00-01-32_00-02-02": "(C) Open Grassland",
    "BV1NtQuYTELJ_00-00-00_00-00-26": "Colombian",
    "BV16j411E7Z9_00-00-13_00-00-34": "(D) Octave interval leap simulates bell",
    "Txj3Qv1lJgs_00-00-00_00-00-16": "2040",
    "f0VchKwpMAk_00-11-10_00-11-30": "B",
}


@pytest.mark.parametrize(
    "version, accuracy, not_in_choices",
    [("jsonl", 0.8, 0), ("json", 0.4, 2)],
    ids=["MMAR-meta.jsonl (Feb 2026)", "MMAR-meta.json (before)"],
)
def test_mmar_both_releases_and_official_file(tmp_path, version, accuracy, not_in_choices):
    root = make_mmar(tmp_path / "MMAR", version)
    bench = _bench("mmar", root)  # default file: the current name, else the old one
    assert Path(bench.source).name == f"MMAR-meta.{version}" and sorted(
        it.id for it in bench.items
    ) == sorted(MMAR_ANSWERS)
    results = _run("mmar", root, MMAR_ANSWERS)
    s = results["tasks"]["mcq"]
    # Old file: "American\nColombian" and "Octave interval leap" are not choices (both rules: wrong); "2040"
    # matches the choice "2040 " once whitespace is stripped.
    assert s["accuracy"] == pytest.approx(accuracy) and s["accuracy_mmau"] == pytest.approx(accuracy)
    assert s["answer_not_in_choices"] == not_in_choices
    path = root / "out" / "mmar_predictions.json"
    for key in (
        "answer_prediction",
        "model_prediction",
    ):  # current code/evaluation.py, and the one before Feb 2026
        total, by_modality = _official_accuracy(path, key, "modality")
        assert total == pytest.approx(s["accuracy_mmau"])
        assert by_modality["music"] == pytest.approx(s["by"]["modality"]["music"]["accuracy_mmau"])
    paper = paper_comparison(results)
    assert paper[0]["label"] == "MMAR-music" and paper[0]["n"] == 2


def test_mmar_jsonl_is_preferred_when_both_are_present(tmp_path):
    root = tmp_path / "MMAR"
    make_mmar(root, "json")
    (root / "MMAR-meta.jsonl").write_text((DATA / "mmar" / "MMAR-meta.jsonl").read_text())
    assert Path(_bench("mmar", root).source).name == "MMAR-meta.jsonl"
    assert Path(_bench("mmar", root, "benchmark.file=MMAR-meta.json").source).name == "MMAR-meta.json"


# ---- MMAU-Pro --------------------------------------------------------------------------------------------------
def test_mmau_pro_parquet_and_official_file(tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    root = make_mmau_pro(tmp_path / "MMAU-Pro")
    bench = _bench("mmau_pro", root)
    assert [it.id for it in bench.items] == ["a3f4c2e0-0001", "a3f4c2e0-0002"]
    assert bench.skipped == {
        "not multiple choice": 2,
        "several audio files": 1,
        "category not in ['music']": 1,
    }
    assert Path(bench.items[0].audio) == root / "data" / "a3f4c2e0-0001.wav"
    results = _run("mmau_pro", root, {"a3f4c2e0-0001": "(A) Sitar", "a3f4c2e0-0002": "(D) 150 BPM"})
    assert results["tasks"]["mcq"]["accuracy"] == pytest.approx(0.5)
    assert paper_comparison(results)[0] | {"note": ""} == {
        "label": "MMAU-Pro-Music", "paper": 65.60, "ours": 50.0, "ours_mmau": 50.0, "n": 2, "metric": "accuracy",
        "note": "",
    }  # fmt: skip
    # evaluate_mmau_pro_comprehensive.py reads the Parquet file with a model_output column, by category.
    table = pq.read_table(root / "out" / "mmau_pro_predictions.parquet").to_pylist()
    assert [(r["id"], r["category"], r["model_output"]) for r in table] == [
        ("a3f4c2e0-0001", "music", "(A) Sitar"),
        ("a3f4c2e0-0002", "music", "(D) 150 BPM"),
    ]
    assert table[0]["choices"] == ["Sitar", "Electric guitar", "Violin", "Harmonium"]
    everything = _bench("mmau_pro", root, "benchmark.categories=null")
    assert len(everything.items) == 3 and everything.counts()["skipped_rows"] == {
        "not multiple choice": 2, "several audio files": 1
    }  # fmt: skip


# ---- MuChoMusic ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("downloader_names", [False, True], ids=["official audio names", "download.py names"])
def test_muchomusic_release_ids_audio_and_official_file(tmp_path, downloader_names):
    root = make_muchomusic(tmp_path / "muchomusic", downloader_names)
    items = {it.id: it for it in _bench("muchomusic", root).items}
    assert sorted(items) == ["1003", "2071", "2207", "2388"]  # question_id, not line numbers
    # SDD's audio/<last two digits of the id>/ folder (MuChoMusic's README: data/sdd/audio/00/415600.2min.mp3).
    assert items["1003"].audio == str(root / "sdd" / "audio" / "00" / "415600.2min.mp3")
    name = "-6pcgdLfb_A_110.wav" if downloader_names else "[-6pcgdLfb_A]-[110-120].wav"
    assert Path(items["2388"].audio).name == name  # a ytid that itself contains "_"
    assert all(it.choices[it.answer_index] == it.answer for it in items.values())
    assert items["2207"].groups["music_reasoning"] == ["Mood and Expression"]

    # The option order of an item does not depend on the other rows: reversed CSV, same options per id.
    lines = (root / "muchomusic.csv").read_text().splitlines()
    (root / "muchomusic.csv").write_text("\n".join(lines[:1] + lines[:0:-1]) + "\n")
    again = {it.id: it.choices for it in _bench("muchomusic", root).items}
    assert again == {k: it.choices for k, it in items.items()}

    answers = {
        "1003": _say(items["1003"], items["1003"].answer_index),  # both parsers: right
        "2071": "Four on the floor.",  # option text: both right
        "2207": "A sad song",  # ours: unparsed; MuChoMusic's: the letter A
        "2388": "Tabla",  # wrong
    }
    results = _run("muchomusic", root, answers)
    s = results["tasks"]["mcq"]
    assert s["accuracy"] == pytest.approx(0.5) and s["unparsed"] == 1
    official_2207 = items["2207"].answer_index == 0
    assert s["accuracy_official"] == pytest.approx((2 + official_2207) / 4)
    assert _official_muchomusic(root / "out" / "muchomusic_predictions.json") == pytest.approx(
        s["accuracy_official"]
    )
    assert "accuracy (the benchmark's own parser)" in (root / "out" / "results.md").read_text()

    # A missing SDD file is reported at the path SDD keeps it under.
    sdd_file = Path("sdd", "audio", "00", "415600.2min.mp3")
    (root / sdd_file).unlink()
    with pytest.raises(BenchmarkError, match=re.escape(str(sdd_file))):
        _bench("muchomusic", root)


# ---- MusicCaps, Music Instruct, MusicAVQA ----------------------------------------------------------------------
def test_musiccaps_release_csv(tmp_path):
    root = make_musiccaps(tmp_path / "musiccaps")
    items = {it.id: it for it in _bench("musiccaps", root).items}
    assert sorted(items) == [
        "-0Gj8-vB1q4_30",
        "-0SdAVK79lg_30",
        "-6pcgdLfb_A_110",
        "3OUNEL8XaR0_30",
        "JC41M7RPSec_0",
    ]
    assert "melancholic,\r\nromantic" in items["3OUNEL8XaR0_30"].answer  # a caption with a line break, kept
    assert Path(items["-6pcgdLfb_A_110"].audio).name == "[-6pcgdLfb_A]-[110-120].wav"
    assert items["-0Gj8-vB1q4_30"].meta["aspects"][:2] == ["low quality", "sustained strings melody"]
    assert len(_bench("musiccaps", root, "benchmark.subset=eval").items) == 3
    results = _run("musiccaps", root, {k: it.answer for k, it in items.items()})
    s = results["tasks"]["caption"]
    assert s["bleu"] == pytest.approx(100.0) and s["rougeL"] == pytest.approx(1.0)


def test_music_instruct_release(tmp_path):
    root = make_music_instruct(tmp_path / "Music-Instruct")
    bench = _bench("music_instruct", root)
    assert bench.rows == 5 and bench.skipped == {"not in split test": 1}
    ids = [it.id for it in bench.items]
    assert len(ids) == 4 and sum(i.endswith("#2") for i in ids) == 1 and all(i.startswith("-") for i in ids)
    assert Path(bench.items[0].audio).name == "[-0Gj8-vB1q4]-[30-40].wav"
    assert bench.items[0].task == "open_qa" and bench.items[0].prompt == "What is the mood of this piece?"
    results = _run("music_instruct", root, {it.id: it.answer for it in bench.items})
    assert results["tasks"]["open_qa"]["rougeL"] == pytest.approx(1.0)
    assert paper_comparison(results)[0]["ours"] is None  # the paper's number is model-judged


def test_music_avqa_template_with_one_answer_that_is_no_yes_or_number(tmp_path):
    """A template whose rows in this split all share an answer that is neither yes/no nor a number word ("left")
    is parsed against that answer alone (it raised a bare "'left' is not in list")."""
    rows = [
        {"video_id": "00000003", "question_id": 3, "type": '["Audio-Visual", "Location"]',
         "question_content": "Where is the first sounding instrument?", "templ_values": "[]",
         "question_deleted": 0, "anser": "left"},
        {"video_id": "00000004", "question_id": 4, "type": '["Audio", "Counting"]',
         "question_content": "How many instruments are sounding?", "templ_values": "[]",
         "question_deleted": 0, "anser": "two"},
    ]  # fmt: skip
    (tmp_path / "data" / "json_update").mkdir(parents=True)
    (tmp_path / "data" / "json_update" / "avqa-test.json").write_text(json.dumps(rows))
    for r in rows:
        tone(tmp_path / "data" / "audio" / f"{r['video_id']}.wav")
    items = {it.id: it for it in _bench("music_avqa", tmp_path, "benchmark.modalities=null").items}
    assert (items["3"].choices, items["3"].answer_index) == (["left"], 0)
    assert "one" in items["4"].choices and items["4"].choices[items["4"].answer_index] == "two"


def test_music_avqa_release(tmp_path):
    root = make_music_avqa(tmp_path / "MUSIC-AVQA")
    bench = _bench("music_avqa", root)
    items = {it.id: it for it in bench.items}
    assert sorted(items, key=int) == ["12", "2945", "3254", "3774", "3854", "3936"]
    assert bench.skipped == {"type not in ['Audio']": 2}
    assert items["2945"].prompt.startswith("Is the clarinet louder than the acoustic guitar?")
    assert items["3254"].choices == ["no", "yes"] and items["3254"].answer == "yes"
    answers = {
        "12": "Only 1 instrument.",
        "2945": "Yes.",
        "3254": "No",
        "3774": "no",
        "3854": "no",
        "3936": "Yes",
    }
    results = _run("music_avqa", root, answers)
    assert results["tasks"]["mcq"]["accuracy"] == pytest.approx(4 / 6)  # "1" counts as "one"
    assert len(_bench("music_avqa", root, "benchmark.modalities=null").items) == 8


# ---- Classification: GTZAN, NSynth, Medley-solos-DB ------------------------------------------------------------
def test_gtzan_release_with_split_list(tmp_path):
    root = make_gtzan(tmp_path / "gtzan")
    assert len(_bench("gtzan", root).items) == 12  # no split list: every clip under genres/
    bench = _bench("gtzan", root, "benchmark.split=test_filtered.txt")
    items = {it.id: it for it in bench.items}
    assert "blues.00000" not in items and len(items) == 10 and items["hiphop.00000"].answer == "hip-hop"
    assert (
        Path(items["blues.00012"].audio).name == "blues.00012.au"
    )  # the list says .wav, the release has .au
    wrong = {"pop.00000", "reggae.00034", "rock.00010"}
    answers = {k: _say(it, (it.answer_index + (k in wrong)) % 10) for k, it in items.items()}
    results = _run("gtzan", root, answers, "benchmark.split=test_filtered.txt")
    assert results["tasks"]["classification"]["accuracy"] == pytest.approx(0.7)
    assert "| GTZAN | accuracy | 84.45 | 70.00 | 70.00 | 10 |  |" in (root / "out" / "results.md").read_text()
    # limit=4 scores 4 of the 10 clips: the paper's number is no yardstick for them, and the row says so
    results = _run("gtzan", root, answers, "benchmark.split=test_filtered.txt", "limit=4", "tag=limited")
    [row] = paper_comparison(results)
    assert row["n"] == 4 and row["note"] == "n=4 of 10 items (limit=4), not comparable"
    assert "| 4 | n=4 of 10 items (limit=4), not comparable |" in (root / "out" / "results.md").read_text()


def test_gtzan_kaggle_copy(tmp_path):
    root = tmp_path / "kaggle"
    for name in ("blues.00012", "jazz.00073"):
        tone(root / "Data" / "genres_original" / name.split(".")[0] / f"{name}.wav")
    bench = _bench("gtzan", root)
    assert [Path(it.audio).name for it in bench.items] == ["blues.00012.wav", "jazz.00073.wav"]


def test_gtzan_kaggle_undecodable_clip_is_named_or_skipped(tmp_path):
    """The Kaggle copy ships jazz.00054.wav undecodable: its length is unknown, so sorting by length puts it in
    the first batch. Without skip_missing_audio the error names it, the setting and the split that avoids it,
    and what was predicted stays; with it the clip is left out and listed like a missing one."""
    from musicflamingo.audio.io import load_audio

    root = tmp_path / "kaggle"
    genres = root / "Data" / "genres_original"
    for name in ("blues.00012", "jazz.00073", "rock.00001"):
        tone(genres / name.split(".")[0] / f"{name}.wav")
    (genres / "jazz" / "jazz.00054.wav").write_bytes(b"RIFF" + b"\0" * 60)  # as shipped: not decodable

    def predict(batch):  # decodes each file as the model's processor does
        for it in batch:
            load_audio(it.audio)
        return [_say(it, it.answer_index) for it in batch]

    out = tmp_path / "out"
    with pytest.raises(EvalConfigError) as err:
        evaluate(_cfg("gtzan", root, out, "batch_size=2"), predict_fn=predict)
    assert re.search(r"item jazz\.00054: .*jazz\.00054\.wav: cannot decode audio", str(err.value))
    assert "benchmark.skip_missing_audio=true" in str(err.value) and "split=test_filtered.txt" in str(
        err.value
    )
    # file order, one item a batch: the clip before the bad one is predicted and stays
    with pytest.raises(EvalConfigError):
        evaluate(_cfg("gtzan", root, out, "batch_size=1", "sort_by_length=false"), predict_fn=predict)
    assert [json.loads(x)["id"] for x in (out / "predictions.jsonl").read_text().splitlines()] == [
        "blues.00012"
    ]
    results = evaluate(_cfg("gtzan", root, out, "benchmark.skip_missing_audio=true"), predict_fn=predict)
    assert results["num_items"] == 4 and results["num_predicted"] == results["num_scored"] == 3
    [skipped] = results["skipped_unreadable_audio"]
    assert skipped["id"] == "jazz.00054" and "cannot decode audio" in skipped["reason"]
    assert results["tasks"]["classification"]["accuracy"] == 1.0
    report = (out / "results.md").read_text()
    assert "- items dropped (audio unreadable): 1" in report and "jazz.00054.wav` (id jazz.00054): " in report
    assert (
        "| GTZAN | accuracy | 84.45 | 100.00 | 100.00 | 3 | n=3 of 4 items (1 audio unreadable), not comparable |"
        in report
    )


@pytest.mark.parametrize("name, label", [("nsynth_family", "guitar"), ("nsynth_source", "acoustic")])
def test_nsynth_release(tmp_path, name, label):
    parent = make_nsynth(tmp_path / "nsynth")
    for root in (parent, parent / "nsynth-test"):  # the split folder or its parent
        items = {it.id: it for it in _bench(name, root).items}
        assert len(items) == 7 and items["guitar_acoustic_010-066-100"].answer == label
        assert Path(items["guitar_acoustic_010-066-100"].audio) == parent / "nsynth-test" / "audio" / (
            "guitar_acoustic_010-066-100.wav"
        )
    wrong = {"bass_synthetic_068-049-025", "vocal_synthetic_003-088-025"}
    n = len(items["bass_synthetic_068-049-025"].choices)
    answers = {k: _say(it, (it.answer_index + (k in wrong)) % n) for k, it in items.items()}
    results = _run(name, parent, answers)
    assert results["tasks"]["classification"]["accuracy"] == pytest.approx(5 / 7)
    assert paper_comparison(results)[0]["ours"] == pytest.approx(500 / 7)


def test_nsynth_split_folder_must_be_the_split_asked_for(tmp_path):
    """split=valid never reads nsynth-test/examples.json (it used to, through a bare examples.json found one
    folder down or in a test split folder given as root)."""
    parent = make_nsynth(tmp_path / "nsynth")
    with pytest.raises(BenchmarkError, match=r"is the NSynth 'test' split, but benchmark.split='valid'"):
        _bench("nsynth_family", parent / "nsynth-test", "benchmark.split=valid")
    with pytest.raises(BenchmarkError, match=r"has no nsynth-valid/examples.json"):
        _bench("nsynth_family", parent, "benchmark.split=valid")


def test_medley_solos_release_subsets(tmp_path):
    root = make_medley_solos(tmp_path / "medley")
    bench = _bench("medley_solos", root)
    assert [it.id[:8] for it in bench.items] == ["0e4371ac", "33383119", "b2b7a288"]
    assert bench.skipped == {"subset not in ['test']": 2} and bench.counts()["rows"] == 5
    assert Path(bench.items[0].audio).name == f"Medley-solos-DB_test-0_{bench.items[0].id}.wav"
    assert [it.id[:8] for it in _bench("medley_solos", root, "benchmark.subset=training").items] == [
        "163fd2b1"
    ]
    results = _run("medley_solos", root, {it.id: "clarinet" for it in bench.items})
    assert results["tasks"]["classification"]["accuracy"] == 1.0


# ---- Lyrics: JamendoLyrics, Opencpop, MUSDB18 ------------------------------------------------------------------
def test_jamendolyrics_release(tmp_path):
    root = make_jamendolyrics(tmp_path / "jamendolyrics")
    items = {it.id: it for it in _bench("jamendolyrics", root).items}
    assert len(items) == 5 and {it.meta["language"] for it in items.values()} == {"en", "es", "de", "fr"}
    name = "Capotes_à_un_Franc_-_elmanu"
    assert items[name].answer == (root / "lyrics" / f"{name}.txt").read_text(encoding="utf-8")
    assert Path(items[name].audio).name == f"{name}.mp3"
    english = _bench("jamendolyrics", root, "benchmark.languages=[English]")
    assert len(english.items) == 2 and english.skipped == {"Language not in ['English']": 3}
    answers = {k: it.answer for k, it in items.items()}
    embers = items["Avercage_-_Embers"].answer
    answers["Avercage_-_Embers"] = embers.replace("thunders", "thunder")  # substitutions only
    english = [items["Avercage_-_Embers"].answer, items["HILA_-_Give_Me_the_Same"].answer]
    words = sum(len(normalize_lyrics(t).split()) for t in english)
    results = _run("jamendolyrics", root, answers)
    s = results["tasks"]["lyrics"]
    assert s["per_language"]["en"]["error"] == pytest.approx(embers.count("thunders") / words)
    assert s["per_language"]["de"]["error"] == 0.0 and s["n_wer"] == 5 and s["n_cer"] == 0


def test_opencpop_release_scored_with_cer(tmp_path):
    root = make_opencpop(tmp_path / "Opencpop")
    items = {it.id: it for it in _bench("opencpop", root).items}
    assert sorted(items) == ["2001000001", "2001000002", "2044000001"]
    assert (
        items["2001000001"].answer == "感受停在我发端的指尖" and items["2001000001"].meta["language"] == "zh"
    )
    # Two real train.txt lines: the same sung phrase twice (uids 80 and 102 of song 2003), a mid-phrase SP.
    train = _bench("opencpop", root, "benchmark.split=train").items
    assert [(it.id, it.answer) for it in train] == [
        ("2003000080", "如果云层是天空的一封信"),
        ("2003000102", "如果云层是天空的一封信"),
    ]
    answers = {"2001000001": "感受停在我发端的指尖", "2001000002": "如何瞬间冻结时间", "2044000001": "我们的"}
    results = _run("opencpop", root, answers)
    s = results["tasks"]["lyrics"]
    assert s["cer"] == pytest.approx(1 / 22) and s["wer"] is None  # one deleted character of 10 + 8 + 4
    assert paper_comparison(results)[0]["ours"] == pytest.approx(100 / 22)


def test_musdb18_lyrics_extension(tmp_path):
    root = make_musdb18_lyrics(tmp_path / "musdb18")
    bench = _bench("musdb18_lyrics", root)
    songs = {it.id: it for it in bench.items}
    assert sorted(songs) == ["Al James - Schoolboy Facination", "Angels In Amplifiers - I'm Alright"]
    assert "oh oh oh" not in songs["Al James - Schoolboy Facination"].answer and bench.skipped == {
        "rejected line (*)": 1
    }
    assert songs["Al James - Schoolboy Facination"].audio.endswith(
        "test/Al James - Schoolboy Facination/mixture.wav"
    )
    lines = {it.id: it for it in _bench("musdb18_lyrics", root, "benchmark.unit=line").items}
    first = lines["Al James - Schoolboy Facination#1"]
    assert (
        len(lines) == 5 and (first.offset, first.duration) == (9.0, 4.0) and first.groups["line_type"] == "a"
    )
    answers = {k: it.answer for k, it in songs.items()}
    results = _run("musdb18_lyrics", root, answers)
    assert results["tasks"]["lyrics"]["wer"] == 0.0
    assert paper_comparison(results)[0] | {"note": ""} == {
        "label": "MUSDB18 lyrics (WER)", "paper": 19.6, "ours": 0.0, "ours_mmau": None, "n": 2, "metric": "wer",
        "note": "",
    }  # fmt: skip


def test_musdb18_stem_mp4(tmp_path):
    """MUSDB18 (not HQ): <split>/<track>.stem.mp4, whose first audio stream is the mixture."""
    if not shutil_which("ffmpeg"):
        pytest.skip("ffmpeg not installed")
    root = make_musdb18_lyrics(tmp_path / "lyrics")
    audio = tmp_path / "MUSDB18"
    for wav in root.glob("test/*/mixture.wav"):
        out = audio / "test" / f"{wav.parent.name}.stem.mp4"
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(wav), "-t", "1", str(out)], check=True)
    bench = _bench("musdb18_lyrics", root, f"benchmark.audio_dir={audio}")
    assert all(it.audio.endswith(".stem.mp4") for it in bench.items)
    from musicflamingo.audio.io import load_audio

    assert len(load_audio(bench.items[0].audio)) > 0


def shutil_which(cmd: str) -> str | None:
    import shutil

    return shutil.which(cmd)


# ---- Unreadable or partial release folders ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, expect",
    [
        (
            "mmau",
            r"has no mmau-test-mini.json; expected layout: <root>/mmau-test-mini.json \+ <root>/test-mini-audios",
        ),
        ("mmar", r"has no MMAR-meta.jsonl or MMAR-meta.json; expected layout: <root>/MMAR-meta.jsonl"),
        ("muchomusic", r"has no muchomusic.csv; expected layout: .*sdd/audio"),
        (
            "gtzan",
            r"has no genre folders \(blues, classical, country, ...\); expected layout: <root>/genres/",
        ),
        ("nsynth_family", r"has no nsynth-test/examples.json; expected layout"),
        ("medley_solos", r"has no Medley-solos-DB_metadata.csv or .*; expected layout"),
        (
            "jamendolyrics",
            r"has no JamendoLyrics.csv; expected layout: <root>/JamendoLyrics.csv \+ <root>/mp3/",
        ),
        ("opencpop", r"has no segments/test.txt or test.txt; expected layout: <root>/segments/test.txt"),
        ("musdb18_lyrics", r"has no test/<track>.txt transcripts; expected layout"),
        ("music_instruct", r"has no MusicInstruct/music_instruct.json or music_instruct.json"),
        ("music_avqa", r"has no data/json_update/avqa-test.json or .*; expected layout"),
        ("mmau_pro", r"has no test.parquet; expected layout: <root>/test.parquet \+ <root>/data/<uuid>.wav"),
        ("musiccaps", r"has no musiccaps-public.csv; expected layout"),
    ],
)
def test_wrong_folder_names_what_is_missing_and_the_layout(tmp_path, name, expect):
    (tmp_path / "not-the-release").mkdir()
    (tmp_path / "not-the-release" / "README.txt").write_text("hello")
    with pytest.raises(BenchmarkError, match=expect) as e:
        _bench(name, tmp_path / "not-the-release")
    assert "\n" not in str(e.value)


def test_partial_release_counts_before_the_first_prediction(tmp_path, caplog):
    root = make_mmau(tmp_path / "MMAU")
    for wav in sorted((root / "test-mini-audios").glob("*.wav"))[:2]:
        wav.unlink()
    with pytest.raises(
        BenchmarkError, match=r"2 of 6 audio files not found .*expected layout: <root>/mmau-test-mini"
    ):
        _bench("mmau", root)
    seen = []

    def predict(batch):
        seen.append([r.getMessage() for r in caplog.records])
        return ["(A)"] * len(batch)

    with caplog.at_level(logging.INFO, logger="musicflamingo.eval"):
        results = evaluate(
            _cfg("mmau", root, root / "out", "benchmark.skip_missing_audio=true", "benchmark.tasks=[music]"),
            predict_fn=predict,
        )
    first = seen[0]
    line = next(m for m in first if "rows read" in m)
    assert "6 rows read" in line and "3 items" not in line
    assert re.search(
        r"\d items, skipped rows: 3 task not in \['music'\], audio missing: \d \(dropped\)", line
    )
    assert results["counts"]["rows"] == 6 and results["counts"]["skipped_rows"] == {
        "task not in ['music']": 3
    }
    assert results["num_items"] == results["counts"]["items"] == 3 - results["counts"]["missing_audio"]
    report = (root / "out" / "results.md").read_text()
    assert "- rows skipped (task not in ['music']): 3" in report


def test_eval_py_wrong_folder_is_one_line(tmp_path):
    from musicflamingo import MusicFlamingoConfig

    ckpt = tmp_path / "ckpt"  # passes the checkpoint check, which comes first; never loaded
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(MusicFlamingoConfig.from_name("tiny").to_hf_dict()))
    (ckpt / "tokenizer.json").write_text("{}")
    (tmp_path / "nsynth").mkdir()
    proc = subprocess.run(
        [sys.executable, str(REPO / "eval.py"), "benchmark=nsynth_family", f"benchmark.root={tmp_path / 'nsynth'}",
         f"ckpt={ckpt}", f"output_dir={tmp_path / 'out'}"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"eval.py: error: benchmark nsynth_family: {tmp_path / 'nsynth'} has no nsynth-test/examples.json; "
        "expected layout: <root>/nsynth-<split>/examples.json + <root>/nsynth-<split>/audio/"
        "<note_str>.wav (or <root> is nsynth-<split> itself)"
    )


@pytest.mark.parametrize("paper", PAPER_RESULTS, ids=lambda p: p.label)
def test_paper_number_only_beside_the_release_it_reports(paper):
    """Each paper number applies to its benchmark's release read as shipped (the YAML's format, split and subset);
    a user's own JSONL through another reader, or another split, gets no paper column."""
    bench = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "benchmark" / f"{paper.benchmark}.yaml"))
    settings = {k: bench.get(k) for k in ("format", "split", "subset", "unit") if k in bench} | dict(
        paper.when
    )

    def labels(**changed):
        results = {"benchmark": paper.benchmark, "settings": settings | changed, "tasks": {}}
        return [row["label"] for row in paper_comparison(results)]

    assert paper.label in labels()
    assert paper.label not in labels(
        format="classification" if bench["format"] != "classification" else "mcq"
    )
    for key in ("split", "subset"):
        if key in dict(paper.when):
            assert paper.label not in labels(**{key: "train"})


def test_filter_values_that_match_no_row_are_refused(tmp_path):
    """A filter value no row has (a typo, the wrong case) is refused with the values present, also when the other
    values match (it would silently drop that subset); JamendoLyrics' languages match names or codes, any case."""
    mmau, mmar = make_mmau(tmp_path / "mmau"), make_mmar(tmp_path / "mmar", "json")
    with pytest.raises(
        BenchmarkError,
        match=r"mmau-test-mini.json: benchmark.tasks: 'Music' matches no row's 'task'; values present: music, "
        r"sound, speech \(did you mean 'Music' -> 'music'\?\)",
    ):
        _bench("mmau", mmau, "benchmark.tasks=[Music]")
    with pytest.raises(BenchmarkError, match=r"benchmark.tasks: 'speach' matches no row's 'task'"):
        _bench("mmau", mmau, "benchmark.tasks=[music,speach]")
    with pytest.raises(
        BenchmarkError, match=r"benchmark.modalities: 'Music' .*values present: mix-sound-speech, music"
    ):
        _bench("mmar", mmar, "benchmark.modalities=[Music]")
    avqa = make_music_avqa(tmp_path / "avqa")
    with pytest.raises(
        BenchmarkError, match=r"'audio' matches no row's 'type'.*did you mean 'audio' -> 'Audio'"
    ):
        _bench("music_avqa", avqa, "benchmark.modalities=[audio]")
    medley = make_medley_solos(tmp_path / "medley")
    with pytest.raises(
        BenchmarkError, match=r"benchmark.subset: 'train' .*values present: test, training, validation"
    ):
        _bench("medley_solos", medley, "benchmark.subset=train")
    jamendo = make_jamendolyrics(tmp_path / "jamendo")
    with pytest.raises(
        BenchmarkError, match=r"benchmark.languages: 'Englsh' .*values present: English, French"
    ):
        _bench("jamendolyrics", jamendo, "benchmark.languages=[German,Englsh]")
    for same in ("[English]", "[english]", "[en]"):
        assert len(_bench("jamendolyrics", jamendo, f"benchmark.languages={same}").items) == 2
    assert len(_bench("mmau", mmau, "benchmark.tasks=[music,speech]").items) == 5


def test_prompt_and_audio_template_mistakes_are_named_before_any_item(tmp_path):
    root = make_mmau(tmp_path / "mmau")
    with pytest.raises(
        BenchmarkError, match=r"unknown placeholder\(s\) \['choices'\]; benchmark mmau fills \{question\}"
    ):
        _bench("mmau", root, "benchmark.prompt='{question} {choices}'")
    with pytest.raises(
        BenchmarkError,
        match=r"unknown placeholder\(s\) \['answer'\].*fills \{question\}, \{options\}, \{labels\}",
    ):
        _bench("gtzan", make_gtzan(tmp_path / "gtzan"), "benchmark.prompt='{answer}'")
    with pytest.raises(BenchmarkError, match=r"not a valid template"):
        _bench("mmau", root, "benchmark.prompt='{question'")
    caps = make_musiccaps(tmp_path / "musiccaps")
    with pytest.raises(
        BenchmarkError, match=r"benchmark.audio_template=.*musiccaps-public.csv:2 \(KeyError: 'start'\)"
    ):
        _bench("musiccaps", caps, "benchmark.audio_template='[{ytid}]-[{start}-{end}].wav'")
    # a null prompt is the reader's default, never the text "None"
    assert {it.prompt for it in _bench("musiccaps", caps, "benchmark.prompt=null").items} == {
        "Describe this music clip in a few sentences, covering genre, instruments, mood and recording quality."
    }


def test_paper_table_covers_the_papers_benchmarks():
    names = {p.benchmark for p in PAPER_RESULTS}
    configs = {p.stem for p in (REPO / "configs" / "benchmark").glob("*.yaml")}
    assert names <= configs
    values = {p.label: p.value for p in PAPER_RESULTS}
    assert values["MMAU-Music (test-mini)"] == 76.35 and values["MMAU-Music (test)"] == 76.83
    assert values["MuChoMusic"] == 74.58 and values["Opencpop (WER)"] == 12.9 and values["GTZAN"] == 84.45
    assert len(values) == 13
