"""Every benchmark config composes, its reader parses a tiny fixture in the release's own format (for the public
benchmarks: tests/release_fixtures.py, rows from the releases), and the whole evaluation runs end to end with a
fake predictor and writes all outputs."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from release_fixtures import RELEASES
from tiny_assets import make_tone, write_audio

from musicflamingo.eval import BenchmarkError, EvalConfigError, EvalItem, build_benchmark, evaluate
from musicflamingo.eval.parsing import option_letter

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
BENCHMARKS = sorted(p.stem for p in (CONFIGS / "benchmark").glob("*.yaml"))


def _tone(path: Path) -> str:
    write_audio(path, make_tone(440.0, 0.05))
    return str(path)


def _compose(name: str, root: Path, *extra: str):
    overrides = [
        f"benchmark={name}",
        f"benchmark.root={root}",
        f"output_dir={root / 'out'}",
        "progress=false",
        *extra,
    ]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="eval", overrides=overrides)


# ---- fixtures, one per release format ---------------------------------------------------------------------------
def write_synthetic(root: Path) -> int:
    _tone(root / "audio" / "a.wav")
    _tone(root / "audio" / "b.wav")
    recs = [
        {
            "id": "m1",
            "task": "mcq",
            "question_type": "tempo",
            "choices": ["60 BPM", "90 BPM", "120 BPM"],
            "answer": "90 BPM",
            "answer_letter": "B",
            "audio": "audio/a.wav",
            "conversations": [
                {
                    "from": "human",
                    "value": "<sound>\nWhat is the tempo?\n(A) 60 BPM\n(B) 90 BPM\n(C) 120 BPM",
                },
                {"from": "gpt", "value": "(B) 90 BPM"},
            ],
        },
        {
            "id": "m2",
            "task": "mcq",
            "question_type": "key",
            "choices": ["C major", "A minor"],
            "answer": "A minor",
            "answer_letter": "B",
            "audio": "audio/b.wav",
            "conversations": [
                {"from": "human", "value": "<sound>What key is it in?"},
                {"from": "gpt", "value": "A minor"},
            ],
        },
        {
            "id": "m3",
            "task": "mcq",
            "question_type": "tempo",
            "choices": ["60 BPM", "90 BPM", "120 BPM"],
            "answer": "60 BPM",
            "answer_letter": "A",
            "audio": "audio/b.wav",
            "conversations": [
                {"role": "user", "content": "<sound>How fast is it?"},
                {"role": "assistant", "content": "60 BPM"},
            ],
        },
        {
            "id": "c1",
            "task": "caption",
            "audio": "audio/a.wav",
            "conversations": [
                {"from": "human", "value": "<sound>Describe the music."},
                {"from": "gpt", "value": "A calm piano piece in C major at 60 BPM."},
            ],
        },
        {"id": "x1", "task": "lyrics_sheet", "audio": "audio/a.wav"},  # not scored here: skipped
    ]
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return 4


def write_mmau(root: Path) -> int:
    recs = []
    for i, (task, choices, answer) in enumerate(
        [
            ("music", ["Piano", "Violin", "Drums", "Flute"], "Violin"),
            ("sound", ["Car", "Train"], "Train"),
            ("music", ["Jazz", "Rock", "Pop", "Blues"], "Blues"),
        ]
    ):
        _tone(root / "test-mini-audios" / f"q{i}.wav")
        recs.append(
            {
                "id": f"q{i}",
                "audio_id": f"./test-mini-audios/q{i}.wav",
                "question": "Which one?",
                "choices": choices,
                "answer": answer,
                "dataset": "x",
                "task": task,
                "split": "test-mini",
                "category": "Perception",
                "sub-category": "Instrument",
                "difficulty": "easy",
            }
        )
    (root / "mmau-test-mini.json").write_text(json.dumps(recs, indent=2), encoding="utf-8")
    return 3


def write_mmar(root: Path) -> int:
    recs = []
    for i, modality in enumerate(["music", "mix-sound-music", "speech"]):
        _tone(root / "audio" / f"r{i}.wav")
        recs.append(
            {
                "id": f"r{i}",
                "audio_path": f"./audio/r{i}.wav",
                "question": "Why?",
                "choices": ["Because A", "Because B", "Because C"],
                "answer": "Because C",
                "modality": modality,
                "category": "Perception Layer",
                "sub-category": "Music Theory",
                "language": "en",
            }
        )
    (root / "MMAR-meta.json").write_text(json.dumps(recs), encoding="utf-8")
    return 3


def write_muchomusic(root: Path) -> int:
    _tone(root / "audio" / "musiccaps" / "[abc_DEF-1]-[30-40].wav")
    write_audio(root / "audio" / "sdd" / "12" / "1234.2min.wav", make_tone(220.0, 0.05))
    cols = [
        "question",
        "dataset",
        "dataset_identifier",
        "genre",
        "music_knowledge",
        "music_reasoning",
        "correct_answer",
        "distractor_1_answer",
        "distractor_2_answer",
        "distractor_3_answer",
    ]
    rows = [
        [
            "What plays?",
            "musiccaps",
            "abc_DEF-1_0.json",
            "Rock",
            "['Instrumentation']",
            "[]",
            "Guitar",
            "Piano",
            "Flute",
            "Harp",
        ],
        ["What mood?", "sdd", "1234.json", "Pop", "[]", "['Mood']", "Happy", "Sad", "Angry", "Calm"],
        ["Tempo?", "sdd", "1234.json", "Pop", "[]", "['Tempo', 'Mood']", "Fast", "Slow", "Medium", "None"],
    ]
    with (root / "muchomusic.csv").open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([cols, *rows])
    return 3


def write_classification(root: Path, labels: list[str]) -> int:
    lines = []
    for i, label in enumerate(labels[:3] + labels[:1]):
        lines.append(
            json.dumps(
                {"audio": _tone(root / "clips" / f"c{i}.wav").replace(str(root) + "/", ""), "label": label}
            )
        )
    (root / "test.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 4


def write_musiccaps(root: Path) -> int:
    cols = [
        "ytid",
        "start_s",
        "end_s",
        "audioset_positive_labels",
        "aspect_list",
        "caption",
        "author_id",
        "is_balanced_subset",
        "is_audioset_eval",
    ]
    rows = [
        [
            "-0Gj8-vB1q4",
            "30",
            "40",
            "/m/0140xf",
            "['low quality', 'sustained strings melody', 'soft female vocal']",
            "The low quality recording features a sustained strings melody and a soft female vocal.",
            "4",
            "False",
            "True",
        ],
        [
            "-0SdAVK79lg",
            "30",
            "40",
            "/m/0155w",
            "['guitar song', 'barking dog']",
            "This song features an electric guitar as the main instrument.",
            "0",
            "True",
            "False",
        ],
    ]
    for r in rows:
        _tone(root / "audio" / f"{r[0]}.wav")
    with (root / "musiccaps-public.csv").open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([cols, *rows])
    return 2


def write_lyrics(root: Path) -> int:
    recs = [
        {"audio": _tone(root / "s1.wav"), "lyrics": "Hello, darkness my old friend", "language": "en"},
        {"audio": "s2.wav", "lyrics": "我爱音乐", "language": "zh"},
        {"audio": "s3.wav", "lyrics": "We will rock you"},
    ]
    _tone(root / "s2.wav")
    _tone(root / "s3.wav")
    (root / "test.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8"
    )
    return 3


# Items each release fixture yields with its config's defaults (rows left out by split/subset/type filters).
RELEASE_ITEMS = {
    "mmau": 6,
    "mmar": 5,
    "mmau_pro": 2,
    "muchomusic": 4,
    "musiccaps": 5,
    "music_instruct": 4,
    "music_avqa": 6,
    "gtzan": 12,
    "nsynth_family": 7,
    "nsynth_source": 7,
    "medley_solos": 3,
    "jamendolyrics": 5,
    "opencpop": 3,
    "musdb18_lyrics": 2,
}


def write_fixture(name: str, root: Path) -> int:
    root.mkdir(parents=True, exist_ok=True)
    if name in RELEASES:
        RELEASES[name](root)
        return RELEASE_ITEMS[name]
    writers = {"synthetic": write_synthetic, "lyrics": write_lyrics}
    return writers[name](root)


def fake_predict(batch: list[EvalItem]) -> list[str]:
    """Right on even-numbered positions in the batch, something else otherwise."""
    out = []
    for k, it in enumerate(batch):
        if it.task in ("mcq", "classification"):
            idx = it.answer_index if k % 2 == 0 else (it.answer_index + 1) % len(it.choices)
            out.append(f"({option_letter(idx)}) {it.choices[idx]}")
        else:
            out.append(it.answer if k % 2 == 0 else "a song")
    return out


# ---- tests --------------------------------------------------------------------------------------------------------
def test_every_benchmark_config_has_a_fixture():
    assert set(BENCHMARKS) == {"synthetic", "lyrics", *RELEASES} == {"synthetic", "lyrics", *RELEASE_ITEMS}


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_composes_reads_and_runs(name, tmp_path):
    expected = write_fixture(name, tmp_path)
    cfg = _compose(name, tmp_path)
    assert cfg.benchmark.name == name and cfg.max_new_tokens == cfg.benchmark.max_new_tokens
    bench = build_benchmark(dict(cfg.benchmark))
    assert len(bench.items) == expected
    assert all(Path(it.audio).is_file() and it.prompt for it in bench.items)

    calls = []
    results = evaluate(cfg, predict_fn=lambda b: calls.append(len(b)) or fake_predict(b))
    out = tmp_path / "out"
    lines = (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    assert sorted(json.loads(x)["id"] for x in lines) == sorted(it.id for it in bench.items)
    assert sum(calls) == expected
    saved = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert saved["num_scored"] == expected and saved["tasks"] == json.loads(json.dumps(results["tasks"]))
    assert (out / "results.md").read_text(encoding="utf-8").startswith(f"# {name}")
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs and all((out / p).stat().st_size > 1000 for p in pngs)
    for task, s in results["tasks"].items():
        if task in ("mcq", "classification"):
            assert 0.0 < s["accuracy"] < 1.0 and s["unparsed"] == 0
            assert any(p.startswith("accuracy_by_") for p in pngs)
        if task == "classification":
            assert "confusion_matrix.png" in pngs and sum(map(sum, s["confusion"])) == expected


def test_mmau_fields_and_groups(tmp_path):
    write_mmau(tmp_path)
    items = build_benchmark(dict(_compose("mmau", tmp_path, "benchmark.tasks=[music]").benchmark)).items
    assert [it.id for it in items] == ["q0", "q2"]
    assert items[0].prompt.splitlines()[2:4] == ["(A) Piano", "(B) Violin"] and items[0].answer_index == 1
    assert items[0].groups == {
        "task": "music",
        "category": "Perception",
        "sub-category": "Instrument",
        "difficulty": "easy",
    }


def test_synthetic_prompts_and_chance(tmp_path):
    write_synthetic(tmp_path)
    cfg = _compose("synthetic", tmp_path)
    items = {it.id: it for it in build_benchmark(dict(cfg.benchmark)).items}
    assert (
        items["m1"].prompt == "What is the tempo?\n(A) 60 BPM\n(B) 90 BPM\n(C) 120 BPM"
    )  # user turn as trained
    assert "(A) C major\n(B) A minor" in items["m2"].prompt  # options added
    assert items["c1"].task == "caption" and items["c1"].answer.startswith("A calm piano")
    results = evaluate(cfg, predict_fn=fake_predict)
    by = results["tasks"]["mcq"]["by"]["question_type"]
    assert by["tempo"]["chance"] == pytest.approx(1 / 3) and by["key"]["chance"] == pytest.approx(1 / 2)
    assert "caption" in results["tasks"]


def test_muchomusic_shuffle_is_seeded(tmp_path):
    write_muchomusic(tmp_path)
    a = build_benchmark(dict(_compose("muchomusic", tmp_path).benchmark)).items
    b = build_benchmark(dict(_compose("muchomusic", tmp_path).benchmark)).items
    c = build_benchmark(dict(_compose("muchomusic", tmp_path, "benchmark.seed=7").benchmark)).items
    assert [it.choices for it in a] == [it.choices for it in b]
    assert [it.choices for it in a] != [it.choices for it in c]
    assert all(it.choices[it.answer_index] == it.answer for it in a)
    assert Path(a[0].audio).name == "[abc_DEF-1]-[30-40].wav" and Path(a[1].audio).name == "1234.2min.wav"
    assert a[2].groups["music_reasoning"] == ["Tempo", "Mood"]


def test_musiccaps_segments(tmp_path):
    write_musiccaps(tmp_path)
    items = build_benchmark(dict(_compose("musiccaps", tmp_path, "benchmark.segment=true").benchmark)).items
    assert (items[0].offset, items[0].duration) == (30.0, 10.0)
    assert items[0].meta["aspects"] == ["low quality", "sustained strings melody", "soft female vocal"]
    evals = build_benchmark(dict(_compose("musiccaps", tmp_path, "benchmark.subset=eval").benchmark)).items
    assert [it.id for it in evals] == ["-0Gj8-vB1q4_30"]


def _jsonl_gtzan(root: Path, *extra: str):
    """GTZAN's config read through the generic JSONL route (format=classification, {audio, label} lines)."""
    labels = list(_compose("gtzan", root).benchmark.labels)
    write_classification(root, labels)
    return _compose("gtzan", root, "benchmark.format=classification", "+benchmark.file=test.jsonl", *extra)


def test_classification_open_mode(tmp_path):
    cfg = _jsonl_gtzan(tmp_path, "benchmark.mode=open")
    items = build_benchmark(dict(cfg.benchmark)).items
    assert "(A)" not in items[0].prompt and "hip-hop" in items[0].prompt
    results = evaluate(cfg, predict_fn=lambda b: ["It is blues."] * len(b))
    s = results["tasks"]["classification"]
    assert s["confusion"][0][0] == 2 and s["accuracy"] == pytest.approx(0.5)


def test_bad_inputs_name_file_line_field(tmp_path):
    write_mmau(tmp_path)
    recs = json.loads((tmp_path / "mmau-test-mini.json").read_text())
    del recs[1]["choices"]
    (tmp_path / "mmau-test-mini.json").write_text(json.dumps(recs))
    # a JSON list has records, not lines: "file:2" would point at the file's second line
    with pytest.raises(
        BenchmarkError, match=r"mmau-test-mini.json record 2 \(id q1\): missing field 'choices'"
    ):
        build_benchmark(dict(_compose("mmau", tmp_path).benchmark))
    (tmp_path / "g").mkdir()
    cfg = _jsonl_gtzan(tmp_path / "g")
    with (tmp_path / "g" / "test.jsonl").open("a") as f:
        f.write(json.dumps({"audio": "clips/c0.wav", "label": "polka"}) + "\n")
    with pytest.raises(
        BenchmarkError, match=r"test.jsonl:5: field 'label' = 'polka' is not in the label set"
    ):
        build_benchmark(dict(cfg.benchmark))
    (tmp_path / "h").mkdir()
    cfg = _jsonl_gtzan(tmp_path / "h")
    (tmp_path / "h" / "clips" / "c1.wav").unlink()
    with pytest.raises(BenchmarkError, match=r"1 of 4 audio files not found \(e.g. .*c1.wav\)"):
        build_benchmark(dict(cfg.benchmark))
    cfg = _compose(
        "gtzan",
        tmp_path / "h",
        "benchmark.format=classification",
        "+benchmark.file=test.jsonl",
        "benchmark.skip_missing_audio=true",
    )
    bench = build_benchmark(dict(cfg.benchmark))
    assert len(bench.items) == 3 and bench.skipped_missing_audio == 1 and bench.missing_audio == 1


def test_config_errors(tmp_path):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=["benchmark=mmau", f"output_dir={tmp_path}"])
    with pytest.raises(EvalConfigError, match="benchmark.root is not set"):
        evaluate(cfg, predict_fn=fake_predict)
    write_mmau(tmp_path)
    with pytest.raises(EvalConfigError, match="ckpt is not set"):
        evaluate(_compose("mmau", tmp_path))
    (tmp_path / "empty_ckpt").mkdir()
    with pytest.raises(EvalConfigError, match="has no config.json"):
        evaluate(_compose("mmau", tmp_path, f"ckpt={tmp_path / 'empty_ckpt'}"))


def test_eval_py_missing_ckpt_is_one_line(tmp_path):
    write_mmau(tmp_path)
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "eval.py"),
            "benchmark=mmau",
            f"benchmark.root={tmp_path}",
            f"ckpt={tmp_path / 'nope'}",
            f"output_dir={tmp_path / 'out'}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr  # cli.run_cli: input errors exit with 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"eval.py: error: ckpt={tmp_path / 'nope'} is not a folder (expected a checkpoint folder with config.json)"
    )
    assert not (tmp_path / "out" / "predictions.jsonl").exists()
