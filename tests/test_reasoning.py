"""Think mode: the output parser, the streaming display, the rewards on crafted strings, the caption-fact scorer,
the MF-Think layout, and `infer.py` / `eval.py` with `think=true` on a tiny checkpoint."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from tiny_assets import make_tone, write_audio, write_tiny_tokenizer
from tiny_checkpoint import write_tiny_checkpoint

from musicflamingo.chat import THINK_SUFFIX, ChatEncoder, think_prompt
from musicflamingo.data.synthetic.text import caption
from musicflamingo.data.synthetic.theory import INSTRUMENT_LABELS, INSTRUMENTS, program_family
from musicflamingo.reasoning import (
    ThinkDisplay,
    ThinkStream,
    parse_think,
    plain_output,
    think_record,
    think_report,
)
from musicflamingo.rewards import (
    KEY_NAMES,
    AccuracyReward,
    CaptionFactsReward,
    Fact,
    FormatReward,
    Target,
    caption_fact_hits,
    caption_fact_score,
    normalize_answer,
    record_facts,
    synthetic_facts,
)

ROOT = Path(__file__).resolve().parents[1]

WELL_FORMED = "<think>The lowest note repeats twice a second.</think><answer>120 BPM</answer>"


# ------------------------------------------------------------------------------------------------ the parser
@pytest.mark.parametrize(
    "text, status, thinking, answer",
    [
        (WELL_FORMED, "ok", "The lowest note repeats twice a second.", "120 BPM"),
        ("\n<think>\nslow\n</think>\n\n<answer> 60 BPM </answer>\n", "ok", "slow", "60 BPM"),
        ("120 BPM", "missing", "", "120 BPM"),
        ("<think>a<think>b</think></think><answer>x</answer>", "broken", "a b", "x"),  # nested think
        ("<think>a</think><answer>x<answer>y</answer></answer>", "broken", "a", "x y"),  # nested answer
        ("<think>a</think>C major", "broken", "a", "C major"),  # no answer tags
        ("<think>a</think><answer>C maj", "broken", "a", "C maj"),  # unclosed answer (cut by max_new_tokens)
        ("<think>still thinking", "broken", "still thinking", ""),  # never answered
        ("Sure. <think>a</think><answer>x</answer>", "broken", "a", "x"),  # text outside the tags
        ("<answer>x</answer><think>a</think>", "broken", "a", "x"),  # out of order
        ("<think>a</think><answer>x</answer><answer>y</answer>", "broken", "a", "y"),  # repeated: the last
    ],
)
def test_parse_think(text, status, thinking, answer):
    out = parse_think(text)
    assert (out.status, out.thinking, out.answer) == (status, thinking, answer)
    assert out.well_formed == (status == "ok") and out.text == text


def test_plain_output_is_all_answer():
    out = plain_output("  (B) 120 BPM\n")
    assert (out.status, out.thinking, out.answer, out.well_formed) == ("plain", "", "(B) 120 BPM", False)


def test_think_prompt_appends_the_paper_suffix():
    assert (
        think_prompt("Key?")
        == "Key?\nOutput the thinking process in <think> </think> and final answer in <answer> </answer>"
    )
    assert think_prompt("") == THINK_SUFFIX


# ------------------------------------------------------------------------------------------------ streaming
def _stream(text: str, dim: bool) -> tuple[str, object]:
    out = io.StringIO()
    view = ThinkDisplay(out, dim=dim)
    for ch in text:  # one character at a time: every tag arrives in pieces
        view.write(ch)
    return out.getvalue(), view.finish(), out


def test_stream_holds_back_partial_tags():
    s = ThinkStream()
    shown = [s.push(d) for d in ("<thi", "nk>low ", "note</", "think><ans", "wer>C</answer>")]
    assert shown == ["", "low", " note", "", ""]  # trailing whitespace waits too: it may end the reasoning
    assert s.finish().answer == "C"


@pytest.mark.parametrize(
    "text",
    [
        "<think>a <think> b</think><answer>B</answer>",  # nested: "<think" was shown and " b" never was
        "<think>x </answer> y</think><answer>B</answer>",
        "<think>x < y and <b>bold</b></think><answer>B</answer>",
        "Sure. <think>a</think><answer>B</answer>",  # text before <think>: the thinking comes at the end
        "\n<think>\nslow\n</think>\n\n<answer> 60 BPM </answer>\n",
        "<think>a</th",
    ],
)
def test_display_streams_a_prefix_of_the_parse(text):
    """Fed one character at a time, the display never shows a piece of a tag, and what it shows of the reasoning
    is exactly the parse's thinking (a prefix while streaming, nothing taken back)."""
    want = parse_think(text)
    s = ThinkStream()
    shown = ""
    for ch in text:
        shown += s.push(ch)
        assert want.thinking.startswith(shown) and "<think" not in shown, shown
    assert shown + s.flush() == want.thinking
    before, parsed, out = _stream(text, dim=False)
    assert parsed == want and out.getvalue().startswith(f"thinking: {want.thinking}\n")


def test_display_shows_reasoning_apart_and_the_answer_last():
    before, parsed, out = _stream(WELL_FORMED, dim=False)
    assert before == "thinking: The lowest note repeats twice a second."  # streamed, the answer held back
    assert out.getvalue() == "thinking: The lowest note repeats twice a second.\nanswer: 120 BPM\n"
    assert parsed.answer == "120 BPM"
    _, _, out = _stream(WELL_FORMED, dim=True)
    assert out.getvalue() == "\x1b[2mThe lowest note repeats twice a second.\x1b[22m\nanswer: 120 BPM\n"


def test_display_names_broken_tags():
    _, parsed, out = _stream("just 120 BPM", dim=False)
    assert (
        out.getvalue() == "answer (missing think/answer tags): just 120 BPM\n" and parsed.status == "missing"
    )
    _, _, out = _stream("<answer>x</answer><think>because</think>", dim=False)
    assert out.getvalue() == "thinking: because\nanswer (broken think/answer tags): x\n"


def test_think_report_counts_statuses_and_lengths():
    answers, rows, summary = think_report({"a": WELL_FORMED, "b": "120 BPM", "c": "<think>x y</think>C"})
    assert answers == {"a": "120 BPM", "b": "120 BPM", "c": "C"}
    assert rows["a"] == {
        "think_status": "ok",
        "thinking": "The lowest note repeats twice a second.",
        "answer_words": 2,
        "thinking_words": 7,
    }
    assert {k: summary[k] for k in ("n", "ok", "missing", "broken")} == {
        "n": 3,
        "ok": 1,
        "missing": 1,
        "broken": 1,
    }
    assert summary["answer_words_mean"] == pytest.approx(5 / 3)
    assert summary["thinking_words_mean"] == pytest.approx(9 / 3)


# ------------------------------------------------------------------------------------------------ rewards
MCQ = Target.from_record(
    {"task": "mcq", "choices": ["60 BPM", "120 BPM", "90 BPM", "160 BPM"], "answer": "120 BPM"}, "120 BPM"
)


@pytest.mark.parametrize(
    "text, fmt",
    [
        (WELL_FORMED, 1.0),
        ("120 BPM", 0.0),  # missing tags
        ("<think>a<think>b</think></think><answer>120 BPM</answer>", 0.0),  # nested
        ("<think>a</think>120 BPM", 0.0),  # no answer tags
        ("<think>a</think> <answer>120 BPM</answer> thanks", 0.0),  # text after
    ],
)
def test_format_reward(text, fmt):
    assert FormatReward()(parse_think(text), MCQ) == fmt


@pytest.mark.parametrize(
    "answer, right",
    [
        ("120 BPM", 1.0),  # the option text
        ("120 bpm.", 1.0),  # normalised
        ("B", 1.0),  # the option letter
        ("(B)", 1.0),
        ("(B) 120 BPM", 1.0),  # letter and text
        ("b. 120 BPM", 1.0),
        ("160 BPM", 0.0),  # another option
        ("C", 0.0),  # another letter
        ("The answer is 120 BPM", 1.0),  # eval's option parser (parse_choice) decides, as at eval time
        ("the answer is B", 1.0),
        ("60 BPM or 120 BPM", 0.0),  # two options: ambiguous
        ("", 0.0),
    ],
)
def test_accuracy_reward_on_the_answer_text(answer, right):
    think = parse_think(f"<think>listening</think><answer>{answer}</answer>")
    assert AccuracyReward()(think, MCQ) == right
    assert AccuracyReward()(plain_output(answer), MCQ) == right  # a run without think mode: the whole text


def test_an_empty_answer_earns_no_format_reward():
    for text in ("<think></think><answer></answer>", "<think>x</think><answer>   </answer>"):
        assert parse_think(text).well_formed and FormatReward()(parse_think(text), MCQ) == 0.0


def test_accuracy_reads_options_as_eval_does():
    """The record's answer names its option in any case or by its letter, and the model's answer is read by eval's
    option parser: "120 bpm" vs the choice "120 BPM" lost the letter, an answer given as "B" lost the text."""
    choices = ["60 BPM", "120 BPM"]
    for answer in ("120 bpm", "B", "(B) 120 BPM"):
        target = Target.from_record({"task": "mcq", "choices": choices, "answer": answer}, "x")
        assert target.correct == 1, answer
        for said in ("B", "120 BPM", "120 bpm", "(B) 120 BPM"):
            assert AccuracyReward()(plain_output(said), target) == 1.0, (answer, said)
        assert AccuracyReward()(plain_output("A"), target) == 0.0
    # options that are letters keep their text's meaning in the record
    letters = Target.from_record({"task": "mcq", "choices": ["B", "A"], "answer": "A"}, "x")
    assert letters.correct == 1


@pytest.mark.parametrize(
    "extra, reference, error",
    [
        ({"answer": ""}, "jazz", "'answer' is empty"),
        ({"answer": ["jazz"]}, "jazz", "'answer' must be a string or a number"),
        ({"answer": True}, "yes", "'answer' must be a string or a number"),
        ({}, "  ", "the last assistant turn is empty"),
        ({}, "<think>r</think><answer>Jazz", "the last assistant turn has think tags but is not"),
        ({"task": "mcq", "choices": ["a", "b"], "answer": "c"}, "c", "'answer' 'c' is none of 'choices'"),
    ],
)
def test_answers_that_would_score_zero_are_refused(extra, reference, error):
    with pytest.raises(ValueError, match=f"train.jsonl:7: {error}"):
        Target.from_record(extra, reference, "train.jsonl:7")
    assert Target.from_record({"answer": 120}, "x").answer == "120"  # numbers are text


def test_accuracy_reward_reads_only_the_answer_and_keeps_sharps():
    key = Target.from_record(
        {"task": "mcq", "choices": ["C minor", "C# minor"], "answer": "C# minor"}, "C# minor"
    )
    assert AccuracyReward()(parse_think("<think>C# minor?</think><answer>C minor</answer>"), key) == 0.0
    assert AccuracyReward()(parse_think("<think>not C</think><answer>C# minor</answer>"), key) == 1.0
    assert normalize_answer("(B) C♯ minor.") == "b c# minor" and normalize_answer("3/4 time") == "3/4 time"
    # Open questions: the reference is the record's last answer (its <answer> part in the MF-Think layout).
    open_qa = Target.from_record({}, "<think>...</think><answer>A violin</answer>")
    assert (open_qa.kind, open_qa.answer) == ("qa", "A violin")
    assert AccuracyReward()(plain_output("a violin"), open_qa) == 1.0
    assert AccuracyReward()(plain_output("x"), Target("caption", "caption", "")) is None  # not a QA sample


META = {
    "key": "Eb major",
    "tempo_bpm": 120,
    "time_signature": "3/4",
    "instrument_family": "Strings",
    "instrument_label": "violin",
    "source_kind": "generated",
    "progression": "I-IV-I-V",
}
CAPTION = Target.from_record({"task": "caption", "meta": META}, "A solo violin ...")


def test_caption_facts_reward_two_of_four():
    two = "A bright violin piece in Eb major, in 4 beats to the bar, at 120 BPM or so."  # key + tempo
    assert caption_fact_hits(two, CAPTION.facts) == {
        "key": True,
        "tempo": True,
        "time_signature": False,
        "instrument_family": False,
    }
    assert CaptionFactsReward()(parse_think(f"<think>t</think><answer>{two}</answer>"), CAPTION) == 0.5
    assert CaptionFactsReward()(parse_think("<think>t</think><answer>noise</answer>"), CAPTION) == 0.0
    assert CaptionFactsReward()(parse_think(WELL_FORMED), MCQ) is None  # QA samples get accuracy instead
    # source=all also reads the thinking
    assert (
        CaptionFactsReward(source="all")(parse_think(f"<think>{two}</think><answer>x</answer>"), CAPTION)
        == 0.5
    )


def test_caption_facts_wrong_values_void_a_category():
    every_key = "It is in " + ", ".join(KEY_NAMES) + ", at 120 BPM, in 3/4, strings family."
    assert caption_fact_hits(every_key, CAPTION.facts)["key"] is False
    assert caption_fact_score(every_key, CAPTION.facts) == 0.75
    assert (
        caption_fact_hits("at 160 BPM", CAPTION.facts)["tempo"] is False
    )  # "60 BPM" is not inside "160 BPM"
    assert caption_fact_hits("in E major", synthetic_facts({**META, "key": "E major"}))["key"] is True
    assert caption_fact_hits("in Eb major", synthetic_facts({**META, "key": "E major"}))["key"] is False


def test_the_corpus_captions_state_every_fact():
    """The scorer speaks the corpus' vocabulary: every caption `text.caption` writes scores 1."""
    for program in INSTRUMENTS:
        for key in ("C major", "C# minor", "Bb minor", "F# major"):
            for bpm, metre in ((60, "2/4"), (160, "5/4")):
                meta = {
                    **META,
                    "key": key,
                    "tempo_bpm": bpm,
                    "time_signature": metre,
                    "instrument_family": program_family(program),
                    "instrument_label": INSTRUMENT_LABELS[program],
                }
                assert caption_fact_score(caption(meta), synthetic_facts(meta)) == 1.0, meta


def test_record_facts_field_and_errors():
    facts = record_facts({"facts": {"genre": "jazz", "bpm": ["120 BPM", "120 beats per minute"]}})
    assert facts == (Fact("genre", ("jazz",)), Fact("bpm", ("120 BPM", "120 beats per minute")))
    assert caption_fact_score("Cool jazz at 120 beats per minute.", facts) == 1.0
    assert record_facts({"meta": {"key": "C major"}}) == ()  # not a synthetic clip: no facts
    with pytest.raises(ValueError, match="train.jsonl:3: 'facts' must be"):
        record_facts({"facts": []}, "train.jsonl:3")
    with pytest.raises(ValueError, match="train.jsonl:4: fact 'genre'"):
        record_facts({"facts": {"genre": ""}}, "train.jsonl:4")
    with pytest.raises(ValueError, match="weight"):
        FormatReward(weight="high")


# ------------------------------------------------------------------------------------------------ MF-Think layout
def test_think_record_layout_and_its_labels(tmp_path):
    from musicflamingo.tokenizer import load_tokenizer

    rec = {
        "id": "q1",
        "audio": "a.wav",
        "task": "mcq",
        "conversations": [
            {"role": "user", "content": "<sound>Tempo?\n(A) 60 BPM (B) 120 BPM"},
            {"role": "assistant", "content": "120 BPM"},
        ],
    }
    out = think_record(rec, "Two beats a second.")
    assert out["conversations"][0]["content"] == think_prompt("<sound>Tempo?\n(A) 60 BPM (B) 120 BPM")
    assert out["conversations"][1]["content"] == "<think>Two beats a second.</think><answer>120 BPM</answer>"
    assert out["task"] == "mcq" and rec["conversations"][1]["content"] == "120 BPM"  # the input is untouched
    tok = load_tokenizer(write_tiny_tokenizer(tmp_path))
    ids, labels = ChatEncoder(tok, (300, 301, 302), pad_token_id=297).encode(out["conversations"], [3])
    learned = [t for t in labels if t != -100]
    # the whole think text is learned, with the closing <|im_end|> (299)
    assert tok.decode(learned[:-1]) == out["conversations"][1]["content"] and learned[-1] == 299


def test_think_record_refuses_other_layouts_and_is_idempotent():
    with pytest.raises(ValueError, match="record 'q1': the last user turn has no assistant answer"):
        think_record({"id": "q1", "conversations": [{"role": "user", "content": "<sound>Tempo?"}]}, "r")
    af3 = {
        "id": "q2",
        "conversations": [{"from": "human", "value": "<sound>?"}, {"from": "gpt", "value": "x"}],
    }
    with pytest.raises(ValueError, match="record 'q2': messages need 'role' and 'content'"):
        think_record(af3, "r")
    with pytest.raises(ValueError, match="record 'q3': 'conversations' must be a list"):
        think_record({"id": "q3"}, "r")
    rec = {
        "id": "q4",
        "conversations": [
            {"role": "user", "content": "<sound>Tempo?"},
            {"role": "assistant", "content": "120 BPM"},
        ],
    }
    once = think_record(rec, "Two beats a second.")
    assert think_record(once, "Two beats a second.") == once  # no second suffix, no nested tags


# ------------------------------------------------------------------------------------------------ infer.py
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


@pytest.fixture(scope="module")
def audio(tmp_path_factory) -> Path:
    return write_audio(tmp_path_factory.mktemp("audio") / "tone.wav", make_tone(440, 1.0))


def _infer_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("infer", overrides=["device=cpu", "dtype=float32", *overrides])


def test_infer_think_adds_the_suffix_and_prints_the_answer_last(ckpt, audio, monkeypatch):
    from musicflamingo import inference

    seen = []
    original = inference.generate_answers

    def spy(model, processor, convs, *args, **kwargs):
        seen.extend(convs)
        return original(model, processor, convs, *args, **kwargs)

    monkeypatch.setattr(inference, "generate_answers", spy)
    out = io.StringIO()
    texts = inference.infer(
        _infer_cfg(f"ckpt={ckpt}", f"audio={audio}", "prompt=Key?", "think=true", "max_new_tokens=5"), out=out
    )
    assert seen[0][-1]["content"][-1]["text"] == think_prompt("Key?")
    printed = out.getvalue()
    # The random model writes no tags: no reasoning, then the answer line, last, named as such.
    assert printed.startswith(f"== {audio} ==\n") and printed.endswith(f": {parse_think(texts[0]).answer}\n")
    assert printed.splitlines()[-1].startswith("answer (missing think/answer tags): ")
    with pytest.raises(inference.InferenceError, match="think='yes'"):
        inference.infer(_infer_cfg(f"ckpt={ckpt}", f"audio={audio}", "think=yes"))


def test_infer_printer_streams_reasoning_apart(ckpt):
    """The batch printer in think mode, fed a well-formed answer token by token."""
    from musicflamingo.inference import _Printer
    from musicflamingo.processor import MusicFlamingoProcessor

    tok = MusicFlamingoProcessor.from_pretrained(ckpt).tokenizer
    ids = tok.encode(WELL_FORMED)
    out = io.StringIO()
    printer = _Printer(tok, ["clip.wav"], out, stream=True, think=True)
    for n in range(1, len(ids) + 1):
        printer.update([ids[:n]], [n == len(ids)])
        if n == len(ids) - 3:  # inside </answer>: the reasoning is out, the answer is not
            assert out.getvalue() == "== clip.wav ==\nthinking: The lowest note repeats twice a second."
    assert (
        out.getvalue()
        == "== clip.wav ==\nthinking: The lowest note repeats twice a second.\nanswer: 120 BPM\n"
    )


def test_chat_think_mode_keeps_the_whole_answer_in_the_history(ckpt, audio):
    from musicflamingo.inference import infer

    out = io.StringIO()
    cfg = _infer_cfg(f"ckpt={ckpt}", f"audio={audio}", "interactive=true", "think=true", "max_new_tokens=4")
    answers = infer(cfg, lines=["Key?", "Tempo?"], out=out)
    assert len(answers) == 2
    assert out.getvalue().count("assistant> ") == 2 and out.getvalue().count("answer (") == 2


# ------------------------------------------------------------------------------------------------ eval.py
def _mcq_benchmark(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    write_audio(root / "a.wav", make_tone(440.0, 0.5))
    recs = [
        {
            "id": f"q{i}",
            "audio": "a.wav",
            "task": "mcq",
            "question_type": "tempo",
            "choices": ["60 BPM", "120 BPM"],
            "answer": "120 BPM",
            "conversations": [
                {"role": "user", "content": "<sound>Tempo?\n(A) 60 BPM (B) 120 BPM"},
                {"role": "assistant", "content": "120 BPM"},
            ],
        }
        for i in range(4)
    ]
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")


def _eval_cfg(root: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(
            "eval",
            overrides=[
                "benchmark=synthetic",
                f"benchmark.root={root}",
                f"output_dir={root / 'out'}",
                "progress=false",
                *overrides,
            ],
        )


def test_eval_think_scores_the_answer_text_and_counts_tags(tmp_path):
    from musicflamingo.eval.runner import evaluate, headline

    _mcq_benchmark(tmp_path)
    outputs = {
        "q0": "<think>two beats a second</think><answer>120 BPM</answer>",  # ok, right
        "q1": "<think>slow</think><answer>60 BPM</answer>",  # ok, wrong
        "q2": "120 BPM",  # missing tags, right
        "q3": "<think>120 BPM, surely</think><answer>",  # broken, no answer: the thinking is not scored
    }
    prompts = []

    def predict(batch):
        prompts.extend(it.prompt for it in batch)
        return [outputs[it.id] for it in batch]

    results = evaluate(_eval_cfg(tmp_path, "think=true"), predict_fn=predict)
    assert all(p.endswith("\n" + THINK_SUFFIX) for p in prompts) and len(prompts) == 4
    assert results["tasks"]["mcq"]["accuracy"] == 0.5 and results["tasks"]["mcq"]["accuracy_mmau"] == 0.5
    t = results["think"]
    assert (t["n"], t["ok"], t["missing"], t["broken"]) == (4, 2, 1, 1)
    assert t["answer_words_mean"] == pytest.approx((2 + 2 + 2 + 0) / 4)
    assert t["thinking_words_mean"] == pytest.approx((4 + 1 + 0 + 3) / 4)
    rows = {
        json.loads(x)["id"]: json.loads(x)
        for x in (tmp_path / "out" / "per_item.jsonl").read_text().splitlines()
    }
    assert rows["q3"]["think_status"] == "broken" and rows["q0"]["thinking"] == "two beats a second"
    saved = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert {r["id"]: r["prediction"] for r in saved} == outputs  # the whole text is kept
    assert "think: ok=2 missing=1 broken=1" in headline(results)
    # A rerun over fewer items (limit) counts the tags of those items only, not the whole predictions file.
    again = evaluate(_eval_cfg(tmp_path, "think=true", "limit=2"), predict_fn=predict)
    assert again["num_items"] == 2 and again["think"]["n"] == 2 and len(prompts) == 4  # resumed: nothing new
    # A think run's folder is not resumed by a plain run (and the other way round).
    from musicflamingo.eval.runner import EvalConfigError

    with pytest.raises(EvalConfigError, match="think"):
        evaluate(_eval_cfg(tmp_path), predict_fn=predict)


def test_eval_think_with_tiny_checkpoint(tmp_path, ckpt):
    from musicflamingo.eval.runner import evaluate

    _mcq_benchmark(tmp_path)
    results = evaluate(
        _eval_cfg(tmp_path, "think=true", f"ckpt={ckpt}", "device=cpu", "dtype=float32", "max_new_tokens=4")
    )
    assert results["tasks"]["mcq"]["n"] == 4 and results["think"]["n"] == 4
    assert results["think"]["ok"] + results["think"]["missing"] + results["think"]["broken"] == 4
    assert torch.isfinite(torch.tensor(results["tasks"]["mcq"]["accuracy"]))
