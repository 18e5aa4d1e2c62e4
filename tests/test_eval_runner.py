"""The runner resumes after an interruption without redoing finished items and records each item exactly once;
build_predict_fn drives the model API as documented (checked with stand-in model/processor classes)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from musicflamingo.eval import (
    EvalConfigError,
    EvalItem,
    PredictionsFileError,
    load_predictions,
    run_benchmark,
)
from musicflamingo.eval.runner import build_predict_fn, evaluate

CHOICES = ["Piano", "Guitar", "Violin", "Drums"]


def make_items(n: int) -> list[EvalItem]:
    return [
        EvalItem(
            f"id{i}",
            f"/data/{i}.wav",
            f"Q{i}?",
            "mcq",
            answer=CHOICES[i % 4],
            choices=CHOICES,
            answer_index=i % 4,
            groups={"kind": "even" if i % 2 == 0 else "odd"},
        )
        for i in range(n)
    ]


class CountingPredictor:
    """Answers every item correctly; raises once ``fail_after`` items have been answered."""

    def __init__(self, fail_after: int | None = None):
        self.fail_after, self.seen = fail_after, []

    def __call__(self, batch: list[EvalItem]) -> list[str]:
        if self.fail_after is not None and len(self.seen) + len(batch) > self.fail_after:
            raise RuntimeError("killed")
        self.seen += [it.id for it in batch]
        return [f"({'ABCD'[it.answer_index]})" for it in batch]


def ids_in(path: Path) -> list[str]:
    return [json.loads(x)["id"] for x in path.read_text(encoding="utf-8").splitlines()]


def test_resume_after_predict_fn_raises(tmp_path):
    items = make_items(10)
    first = CountingPredictor(fail_after=6)
    with pytest.raises(RuntimeError, match="killed"):
        run_benchmark(items, first, tmp_path, batch_size=3, progress=False)
    assert first.seen == [f"id{i}" for i in range(6)]  # two full batches written before the failure
    assert ids_in(tmp_path / "predictions.jsonl") == first.seen

    second = CountingPredictor()
    results = run_benchmark(items, second, tmp_path, batch_size=3, progress=False)
    assert second.seen == [f"id{i}" for i in range(6, 10)]  # only the unfinished items
    assert sorted(ids_in(tmp_path / "predictions.jsonl")) == sorted(it.id for it in items)
    assert results["tasks"]["mcq"]["accuracy"] == 1.0 and results["num_scored"] == 10

    third = CountingPredictor()
    run_benchmark(items, third, tmp_path, batch_size=3, progress=False)
    assert third.seen == [] and len(ids_in(tmp_path / "predictions.jsonl")) == 10


@pytest.mark.parametrize(
    "tail", ['{"id": "id3", "predic', '{"id": "id3", "prediction": "(A)\n'], ids=["no-newline", "bad-json"]
)
def test_resume_after_torn_last_line(tmp_path, tail):
    items = make_items(5)
    run_benchmark(items[:3], CountingPredictor(), tmp_path, batch_size=2, progress=False)
    pred_file = tmp_path / "predictions.jsonl"
    with pred_file.open("a", encoding="utf-8") as f:
        f.write(tail)  # what a kill in the middle of a write leaves behind
    again = CountingPredictor()
    run_benchmark(items, again, tmp_path, batch_size=2, progress=False)
    assert again.seen == ["id3", "id4"]
    assert ids_in(pred_file) == [f"id{i}" for i in range(5)]  # each once, file fully valid JSON lines


def test_damage_before_the_last_line_is_an_error(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text(
        '{"id": "a", "prediction": "x"}\nnot json\n{"id": "b", "prediction": "y"}\n', encoding="utf-8"
    )
    with pytest.raises(PredictionsFileError, match=r"predictions.jsonl:2"):
        load_predictions(path)


def test_duplicate_ids_keep_first(tmp_path):
    path = tmp_path / "predictions.jsonl"
    path.write_text('{"id": "a", "prediction": "x"}\n{"id": "a", "prediction": "y"}\n', encoding="utf-8")
    assert load_predictions(path) == {"a": "x"}


def test_predict_fn_must_answer_every_item(tmp_path):
    with pytest.raises(ValueError, match="returned 1 answers for a batch of 2"):
        run_benchmark(make_items(2), lambda b: ["A"], tmp_path, batch_size=2, progress=False)


def _write_mcq_fixture(root: Path, seconds: tuple[float, ...] = (0.05,) * 4) -> None:
    from tiny_assets import make_tone, write_audio

    recs = []
    for i in range(4):
        write_audio(root / "a" / f"{i}.wav", make_tone(440.0, seconds[i]))
        recs.append(
            {
                "id": f"q{i}",
                "audio_id": f"./a/{i}.wav",
                "question": "Which?",
                "choices": CHOICES,
                "answer": CHOICES[i],
                "task": "music",
                "category": "c",
                "sub-category": "s",
                "difficulty": "easy",
            }
        )
    (root / "mmau-test-mini.json").write_text(json.dumps(recs), encoding="utf-8")


def _cfg(root: Path, *extra: str):
    from hydra import compose, initialize_config_dir

    configs = Path(__file__).resolve().parents[1] / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        return compose(
            config_name="eval",
            overrides=[
                "benchmark=mmau",
                f"benchmark.root={root}",
                f"output_dir={root / 'out'}",
                "progress=false",
                *extra,
            ],
        )


def test_evaluate_resumes_and_guards_output_dir(tmp_path):
    _write_mcq_fixture(tmp_path)
    first = CountingPredictor(fail_after=2)
    with pytest.raises(RuntimeError):
        evaluate(_cfg(tmp_path, "batch_size=2"), predict_fn=first)
    second = CountingPredictor()
    results = evaluate(_cfg(tmp_path, "batch_size=2"), predict_fn=second)
    assert first.seen == ["q0", "q1"] and second.seen == ["q2", "q3"] and results["num_scored"] == 4
    # Same folder, different prompt settings: refused instead of mixing predictions.
    with pytest.raises(EvalConfigError, match="differs in: benchmark_cfg"):
        evaluate(_cfg(tmp_path, "benchmark.prompt='{question} {options}'"), predict_fn=CountingPredictor())
    # ... or a quantized model's answers beside full-precision ones
    with pytest.raises(EvalConfigError, match="differs in: quantize"):
        evaluate(_cfg(tmp_path, "quantize=int4"), predict_fn=CountingPredictor())
    # ... or answers to another system turn
    with pytest.raises(EvalConfigError, match="differs in: system_prompt"):
        evaluate(_cfg(tmp_path, "system_prompt='Be brief.'"), predict_fn=CountingPredictor())
    # A run that failed before its first prediction locks nothing: the corrected rerun goes ahead.
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError):
        evaluate(_cfg(tmp_path, f"output_dir={fresh}"), predict_fn=CountingPredictor(fail_after=0))
    assert (fresh / "predictions.jsonl").read_text() == ""
    assert (
        evaluate(_cfg(tmp_path, f"output_dir={fresh}", "max_new_tokens=9"), predict_fn=CountingPredictor())[
            "num_scored"
        ]
        == 4
    )
    # limit scores a prefix and reuses the predictions.
    limited = evaluate(_cfg(tmp_path, "limit=2"), predict_fn=CountingPredictor())
    assert limited["num_items"] == 2


class BatchRecorder(CountingPredictor):
    def __init__(self, fail_after: int | None = None):
        super().__init__(fail_after)
        self.batches: list[list[str]] = []

    def __call__(self, batch: list[EvalItem]) -> list[str]:
        out = super().__call__(batch)
        self.batches.append([it.id for it in batch])
        return out


def test_batches_group_similar_lengths_longest_first(tmp_path):
    """`sort_by_length` (the default) batches items by audio length, longest first, so a long song does not pad
    a batch of short clips; off, file order. A resumed run sorts what is left; every item is predicted once."""
    _write_mcq_fixture(tmp_path, seconds=(0.05, 0.4, 0.1, 0.3))
    rec = BatchRecorder()
    evaluate(_cfg(tmp_path, "batch_size=2"), predict_fn=rec)
    assert rec.batches == [["q1", "q3"], ["q2", "q0"]]
    plain = BatchRecorder()
    evaluate(
        _cfg(tmp_path, "batch_size=2", "sort_by_length=false", f"output_dir={tmp_path / 'o2'}"),
        predict_fn=plain,
    )
    assert plain.batches == [["q0", "q1"], ["q2", "q3"]]
    first = BatchRecorder(fail_after=3)
    with pytest.raises(RuntimeError):
        evaluate(_cfg(tmp_path, "batch_size=2", f"output_dir={tmp_path / 'o3'}"), predict_fn=first)
    second = BatchRecorder()
    results = evaluate(_cfg(tmp_path, "batch_size=2", f"output_dir={tmp_path / 'o3'}"), predict_fn=second)
    assert first.batches == [["q1", "q3"]] and second.batches == [["q2", "q0"]] and results["num_scored"] == 4


def test_item_seconds(tmp_path):
    """Segment length when given, else the file's length after the offset from its header; unknown -> inf."""
    from tiny_assets import make_tone, write_audio

    from musicflamingo.eval.runner import item_seconds

    write_audio(tmp_path / "a.wav", make_tone(440.0, 2.0))
    item = EvalItem("a", str(tmp_path / "a.wav"), "Q?", "mcq")
    assert item_seconds(item) == pytest.approx(2.0, abs=1e-3)
    assert item_seconds(EvalItem("a", str(tmp_path / "a.wav"), "Q?", "mcq", offset=0.5)) == pytest.approx(
        1.5, abs=1e-3
    )
    assert (
        item_seconds(EvalItem("a", str(tmp_path / "a.wav"), "Q?", "mcq", offset=0.5, duration=0.25)) == 0.25
    )
    assert item_seconds(EvalItem("b", str(tmp_path / "missing.wav"), "Q?", "mcq")) == float("inf")
    (tmp_path / "junk.wav").write_bytes(b"not audio")
    assert item_seconds(EvalItem("c", str(tmp_path / "junk.wav"), "Q?", "mcq")) == float("inf")


def test_build_predict_fn_drives_the_model_api(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    from musicflamingo import MusicFlamingoConfig
    from musicflamingo.checkpoint import stop_token_ids

    # a real config: its parameter count decides whether the weights fit in memory
    config = MusicFlamingoConfig.from_name("tiny")
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf_dict()))
    (tmp_path / "tokenizer.json").write_text("{}")  # the folder check wants one; FakeProcessor ignores it
    # an eos of generation_config.json that is not the config's: eval stops on it too, like infer
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 77]}))
    seen = {}

    class FakeProcessor:
        kept_seconds = 1200.0  # the processor's cap on decoded audio (40 windows of 30 s)

        @classmethod
        def from_pretrained(cls, path):
            seen["processor_dir"] = path
            return cls()

        def apply_chat_template(self, conversations, **kw):
            seen["conversations"], seen["template_kw"] = conversations, kw
            b = len(conversations)
            return {
                "input_ids": torch.ones(b, 5, dtype=torch.long),
                "attention_mask": torch.ones(b, 5, dtype=torch.long),
                "input_features": torch.zeros(b, 128, 30),
                "input_features_mask": torch.ones(b, 30, dtype=torch.int32),
            }

        def batch_decode(self, ids, skip_special_tokens=True):
            seen["decoded"] = ids.tolist()
            return [" ".join(map(str, row)) + " " for row in ids.tolist()]

    class FakeModel:
        @classmethod
        def from_pretrained(cls, path, dtype=None, device=None, quantize=None):
            seen["load"] = (path, dtype, device)
            seen["quantize"] = quantize
            return cls()

        def eval(self):
            return self

        def generate(
            self,
            input_ids,
            attention_mask,
            input_features,
            input_features_mask,
            max_new_tokens,
            do_sample,
            stop_token_ids,
        ):
            seen["gen"] = (max_new_tokens, do_sample, input_features.dtype)
            seen["stops"] = stop_token_ids
            new = torch.arange(3).repeat(input_ids.shape[0], 1) + 7
            return torch.cat([input_ids, new], dim=1)

    import musicflamingo
    import musicflamingo.inference  # noqa: F401 (imported before the stand-in audio.io below replaces the real one)

    monkeypatch.setattr(musicflamingo, "MusicFlamingo", FakeModel, raising=False)
    monkeypatch.setattr(musicflamingo, "MusicFlamingoProcessor", FakeProcessor, raising=False)
    io_mod = types.ModuleType("musicflamingo.audio.io")
    io_mod.load_audio = lambda path, offset=0.0, duration=None, max_seconds=None: (
        "segment",
        path,
        offset,
        duration,
        max_seconds,
    )
    monkeypatch.setitem(sys.modules, "musicflamingo.audio.io", io_mod)

    fn = build_predict_fn({"ckpt": str(tmp_path), "device": "cpu", "dtype": "float32", "max_new_tokens": 3})
    items = [
        EvalItem("a", "/x/a.wav", "Q1", "mcq"),
        EvalItem("b", "/x/b.wav", "Q2", "caption", offset=30.0, duration=10.0),
    ]
    assert fn(items) == ["7 8 9", "7 8 9"]  # only the new tokens, stripped
    assert seen["load"] == (str(tmp_path), torch.float32, torch.device("cpu")) and seen["quantize"] is None
    assert seen["gen"] == (3, False, torch.float32)
    assert seen["stops"] == stop_token_ids(tmp_path, config) == sorted({5, 77, config.text.eos_token_id})
    assert seen["template_kw"] == {"tokenize": True, "add_generation_prompt": True, "return_dict": True}
    first, second = (c[0]["content"] for c in seen["conversations"])
    assert first == [{"type": "audio", "path": "/x/a.wav"}, {"type": "text", "text": "Q1"}]
    assert second[0] == {
        "type": "audio",
        "audio": ("segment", "/x/b.wav", 30.0, 10.0, 1200.0),
    }  # decoded up to the cap
    assert [m["role"] for m in seen["conversations"][0]] == [
        "user"
    ]  # the processor adds its default system turn

    # system_prompt: the turn a fine-tune was trained with goes first in every conversation
    fn = build_predict_fn(
        {
            "ckpt": str(tmp_path),
            "device": "cpu",
            "dtype": "float32",
            "max_new_tokens": 3,
            "system_prompt": "Be brief.",
        }
    )
    fn(items[:1])
    assert seen["conversations"][0][0] == {"role": "system", "content": "Be brief."}
    assert seen["conversations"][0][1]["content"] == first

    # system_prompt="" is an empty system turn (as infer.py and the reference), not the default one
    fn = build_predict_fn(
        {"ckpt": str(tmp_path), "device": "cpu", "dtype": "float32", "max_new_tokens": 3, "system_prompt": ""}
    )
    fn(items[:1])
    assert seen["conversations"][0][0] == {"role": "system", "content": ""}


def test_build_predict_fn_refuses_weights_larger_than_memory(tmp_path, monkeypatch):
    """Checked before loading, as in infer.py (`runtime.resolve_device_dtype`), as an EvalConfigError."""
    pytest.importorskip("torch")
    import musicflamingo.runtime as runtime
    from musicflamingo import MusicFlamingoConfig

    (tmp_path / "config.json").write_text(json.dumps(MusicFlamingoConfig.from_name("tiny").to_hf_dict()))
    (tmp_path / "tokenizer.json").write_text("{}")
    monkeypatch.setattr(runtime, "available_memory", lambda device: 1000)
    with pytest.raises(EvalConfigError, match=r"weights need .* in float32 but cpu has 0\.0 GB available"):
        build_predict_fn({"ckpt": str(tmp_path), "device": "cpu", "dtype": "float32"})


def test_evaluate_with_tiny_checkpoint(tmp_path):
    """The real model path: a random tiny checkpoint saved with save_pretrained, greedy decoding on CPU, audio
    passed by path (MMAU) and as a cut segment (lyrics items with offset/duration)."""
    torch = pytest.importorskip("torch")
    from tiny_assets import make_tone, write_audio, write_tiny_tokenizer

    from musicflamingo import MusicFlamingo, MusicFlamingoConfig, MusicFlamingoProcessor
    from musicflamingo.tokenizer import load_tokenizer

    torch.manual_seed(0)
    ckpt = tmp_path / "ckpt"
    MusicFlamingo(MusicFlamingoConfig.from_name("tiny")).save_pretrained(ckpt)
    MusicFlamingoProcessor(load_tokenizer(write_tiny_tokenizer(tmp_path / "tok"))).save_pretrained(ckpt)
    run = ("device=cpu", "dtype=float32", "max_new_tokens=3", "batch_size=2", f"ckpt={ckpt}")

    _write_mcq_fixture(tmp_path / "mmau")
    results = evaluate(_cfg(tmp_path / "mmau", *run))
    preds = load_predictions(tmp_path / "mmau" / "out" / "predictions.jsonl")
    assert sorted(preds) == ["q0", "q1", "q2", "q3"] and results["num_scored"] == 4
    assert results["tasks"]["mcq"]["n"] == 4 and (tmp_path / "mmau" / "out" / "results.md").exists()

    root = tmp_path / "lyr"
    write_audio(root / "s.wav", make_tone(440.0, 0.5))
    recs = [
        {"audio": "s.wav", "lyrics": "la la", "offset": 0.1, "duration": 0.2},
        {"audio": "s.wav", "lyrics": "我爱", "language": "zh"},
    ]
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(
        config_dir=str(Path(__file__).resolve().parents[1] / "configs"), version_base="1.3"
    ):
        cfg = compose(
            config_name="eval",
            overrides=[
                "benchmark=lyrics",
                f"benchmark.root={root}",
                f"output_dir={root / 'out'}",
                "progress=false",
                *run,
            ],
        )
    lyr = evaluate(cfg)
    assert lyr["num_scored"] == 2 and lyr["tasks"]["lyrics"]["n_wer"] == 1


def test_resume_refuses_resaved_checkpoint_or_other_dtype(tmp_path, monkeypatch):
    """The checkpoint folder re-saved in place (a continued train.py re-exports <run>/export) or another dtype:
    refused instead of appending the other model's answers; a run.json from before these keys still resumes."""
    torch = pytest.importorskip("torch")
    from tiny_assets import write_tiny_tokenizer

    from musicflamingo import MusicFlamingo, MusicFlamingoConfig, MusicFlamingoProcessor
    from musicflamingo.eval import runner
    from musicflamingo.tokenizer import load_tokenizer

    torch.manual_seed(0)
    ckpt = tmp_path / "ckpt"
    MusicFlamingo(MusicFlamingoConfig.from_name("tiny")).save_pretrained(ckpt)
    MusicFlamingoProcessor(load_tokenizer(write_tiny_tokenizer(tmp_path / "tok"))).save_pretrained(ckpt)
    _write_mcq_fixture(tmp_path)
    # the identity is what is checked: a stand-in answers instead of loading the model
    monkeypatch.setattr(runner, "build_predict_fn", lambda cfg: CountingPredictor(fail_after=2))
    run = ("device=cpu", "batch_size=2", f"ckpt={ckpt}")
    with pytest.raises(RuntimeError):  # killed after 2 predictions
        evaluate(_cfg(tmp_path, "dtype=float32", *run))
    identity = json.loads((tmp_path / "out" / "run.json").read_text())
    assert identity["dtype"] == "float32" and identity["weights"]
    with pytest.raises(EvalConfigError, match=r"differs in: dtype\)"):
        evaluate(_cfg(tmp_path, "dtype=bfloat16", *run))
    torch.manual_seed(1)
    MusicFlamingo(MusicFlamingoConfig.from_name("tiny")).save_pretrained(ckpt)  # same path, new weights
    with pytest.raises(EvalConfigError, match=r"differs in: weights\)"):
        evaluate(_cfg(tmp_path, "dtype=float32", *run))
    # a folder from before dtype / weights were recorded resumes as it did (and records them from now on)
    old = {k: v for k, v in identity.items() if k not in ("dtype", "weights")}
    (tmp_path / "out" / "run.json").write_text(json.dumps(old))
    monkeypatch.setattr(runner, "build_predict_fn", lambda cfg: CountingPredictor())
    assert evaluate(_cfg(tmp_path, "dtype=float32", *run))["num_scored"] == 4
    assert json.loads((tmp_path / "out" / "run.json").read_text())["dtype"] == "float32"


@pytest.mark.parametrize(("cer_languages", "n_cer"), [("[]", 0), ("[zh]", 1)])
def test_an_empty_cer_language_list_scores_every_language_with_wer(tmp_path, cer_languages, n_cer):
    """benchmark.cer_languages=[] asks for WER everywhere; it was taken for unset (`or` the default list), so
    Chinese items still got CER."""
    from tiny_assets import make_tone, write_audio

    root = tmp_path / "lyr"
    write_audio(root / "s.wav", make_tone(440.0, 0.5))
    recs = [{"audio": "s.wav", "lyrics": "la la"}, {"audio": "s.wav", "lyrics": "我 爱", "language": "zh"}]
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    cfg = _cfg(root, "benchmark=lyrics", f"benchmark.cer_languages={cer_languages}")
    lyr = evaluate(cfg, predict_fn=lambda batch: [it.answer for it in batch])
    assert lyr["tasks"]["lyrics"]["n_cer"] == n_cer and lyr["tasks"]["lyrics"]["n_wer"] == 2 - n_cer
