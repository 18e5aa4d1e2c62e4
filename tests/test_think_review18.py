"""Think tags that are special tokens, review 18: infer, chat, eval and serve keep them as text.

A think-SFT recipe may add ``<think>``, ``</think>``, ``<answer>``, ``</answer>`` to the vocabulary as special tokens.
The answers were decoded skipping special tokens (`engine.AnswerText`, eval's plain decode), so the tags vanished
before think mode parsed them: infer.py printed "answer (missing think/answer tags): two beats a second120 BPM",
eval.py scored reasoning and answer run together (every item `missing`, accuracy 0), serve.py gave no
`reasoning_content`, and a chat answer cut by a `</answer>` stop string fed its tail into the history again. The tags
are decoded as text now (`reasoning.TagsKept`), other special tokens still skipped.
"""

from __future__ import annotations

import io
import json
import shutil

import httpx
import pytest
import torch
from test_infer_review6 import make_cfg
from test_reasoning import _eval_cfg, _mcq_benchmark
from test_serve import MODEL, running_server, user_turn
from test_think_stop_review16 import force_tokens
from test_train_review18 import _tokenizer_with_special_tags
from tiny_assets import make_tone, write_audio

from musicflamingo import MusicFlamingo, MusicFlamingoConfig, MusicFlamingoProcessor
from musicflamingo.engine import AnswerText, SamplingParams
from musicflamingo.inference import ChatSession, infer, load_model, run_chat
from musicflamingo.reasoning import TagsKept, ThinkStream

THINKING, ANSWER = "two beats a second", "120 BPM"
SAID = f"<think>{THINKING}</think><answer>{ANSWER}</answer><|im_end|>"
WHOLE = f"<think>{THINKING}</think><answer>{ANSWER}</answer>"
CUT = f"<think>{THINKING}</think><answer>{ANSWER}"  # cut before a `</answer>` stop string
TAGS = ("<think>", "</think>", "<answer>", "</answer>")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny checkpoint whose tokenizer has the four tags as special tokens (ids 303..306; vocabulary 320)."""
    root = tmp_path_factory.mktemp("tagged")
    config = MusicFlamingoConfig.from_name("tiny", text={"vocab_size": 320})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        MusicFlamingo(config).eval().save_pretrained(root / "ckpt")
    tok = _tokenizer_with_special_tags(root)
    MusicFlamingoProcessor(tok, chunk_length=config.window_seconds).save_pretrained(root / "ckpt")
    return root / "ckpt"


@pytest.fixture(scope="module")
def loaded(ckpt):
    return load_model(ckpt, "cpu", "float32")


@pytest.fixture(scope="module")
def song(tmp_path_factory):
    return write_audio(tmp_path_factory.mktemp("audio") / "song.wav", make_tone(440, 1.0))


@pytest.fixture
def scripted(monkeypatch, loaded):
    """Every engine (infer's, chat's, eval's model.generate, serve's worker) picks the tokens of `SAID` in order,
    whatever the tiny model's logits; the tags are single special tokens."""
    tok = loaded[1].tokenizer
    ids = tok.encode(SAID)
    assert [tok.token_to_id(t) for t in TAGS] == [i for i in ids if tok.id_to_token(i) in TAGS]
    assert tok.decode(ids) == THINKING + ANSWER  # the tokenizer alone drops them
    force_tokens(monkeypatch, ids)
    return ids


# ---------------------------------------------------------------------------------------------- decoding
def test_answer_text_keeps_special_tags_streams_them_whole_and_stops_at_answer_close(tmp_path):
    tok = _tokenizer_with_special_tags(tmp_path)
    ids = tok.encode(SAID)
    assert (
        TagsKept.wrap(TagsKept.wrap(tok)).decode(ids) == WHOLE
    )  # wrapping twice is once; <|im_end|> skipped
    for stops, text, stop in (((), WHOLE, None), (("</answer>",), CUT, "</answer>")):
        answer, shown, deltas = AnswerText(tok, stops), 0, []
        for i in ids:
            done = answer.push(i)
            deltas.append(answer.since(shown))
            shown = len(answer)
            if done:
                break
        answer.finish()
        deltas.append(answer.since(shown))
        assert (answer.text, answer.stop) == (text, stop)
        assert "".join(deltas) == text
        # each tag arrives whole, in one delta: never half of one
        assert [d for d in deltas if "<" in d] == [t for t in TAGS if t in text]
        stream = ThinkStream()
        if (
            stop
        ):  # `</answer>` as a stop id: the same answer, named as ended by it (GRPO's completions read so)
            by_id = AnswerText.of_tokens(tok, ids, (), (tok.token_to_id("</answer>"),))
            assert (by_id.text, by_id.stop) == (CUT, "</answer>")
        assert "".join(stream.push(d) for d in deltas) + stream.flush() == THINKING
        assert stream.finish(stop).answer == ANSWER and stream.finish(stop).status == "ok"


# ---------------------------------------------------------------------------------------------- infer and chat
@pytest.mark.parametrize("stop", [None, "</answer>"])
def test_infer_think_splits_reasoning_from_answer_with_special_tags(ckpt, song, scripted, tmp_path, stop):
    """infer.py think=true printed "answer (missing think/answer tags): two beats a second120 BPM"."""
    printed = io.StringIO()
    extra = [f"stop='{stop}'"] if stop else []
    cfg = [f"ckpt={ckpt}", f"audio={song}", "prompt=Tempo?", "think=true", "max_new_tokens=40", *extra]
    got = infer(make_cfg(*cfg, f"output={tmp_path / 'a.jsonl'}"), out=printed)
    assert got == [CUT if stop else WHOLE]
    assert f"thinking: {THINKING}\n" in printed.getvalue()
    assert f"answer: {ANSWER}\n" in printed.getvalue()
    (row,) = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert (row["thinking"], row["answer"]) == (THINKING, ANSWER)


@pytest.mark.parametrize("as_id", [False, True])
def test_chat_cut_at_a_special_answer_close_keeps_the_history_whole(loaded, scripted, as_id):
    """The rest of an answer cut by a stop string was measured with the tags skipped: `</think><answer>120 BPM`
    was fed again after the answer, into the history of the next turn. `as_id`: `</answer>` is a stop id (an eos
    id of the recipe), which ends the answer as the stop string does: complete, not "broken"."""
    model, processor = loaded
    tok = processor.tokenizer
    close = tok.token_to_id("</answer>")
    stops = dict(stop_ids=(299, close)) if as_id else dict(stop_ids=(299,), stop_strings=("</answer>",))
    session = ChatSession(model, processor, SamplingParams(max_new_tokens=40, **stops))
    out = io.StringIO()
    assert run_chat(session, ["Tempo?"], out=out, think=True) == [CUT]
    assert f"answer: {ANSWER}\n" in out.getvalue() and "broken" not in out.getvalue()
    assert session.last_stop == "</answer>"
    assert session.pending == [session.end_of_turn_id]
    assert (
        TagsKept.wrap(tok)
        .decode(session.history_ids, skip_special_tokens=False)
        .endswith(f"<|im_start|>assistant\n{CUT}<|im_end|>")
    )


# ---------------------------------------------------------------------------------------------- eval
@pytest.mark.parametrize("eos_tag", [False, True])
def test_eval_think_scores_the_answer_with_special_tags(ckpt, scripted, tmp_path, eos_tag):
    """eval.py think=true counted every item `missing` and scored the reasoning and the answer run together
    (accuracy 0). `eos_tag`: generation_config.json's eos ids hold `</answer>`: its answers end there (left out,
    as infer.py's), read as complete (`"stop"` names it)."""
    from musicflamingo.eval.runner import evaluate

    if eos_tag:
        ckpt = shutil.copytree(ckpt, tmp_path / "eos_tag")
        gen = json.loads((ckpt / "generation_config.json").read_text())
        gen["eos_token_id"] = [299, scripted[-2]]  # <|im_end|>, </answer>
        (ckpt / "generation_config.json").write_text(json.dumps(gen))
    _mcq_benchmark(tmp_path)
    cfg = ["think=true", f"ckpt={ckpt}", "device=cpu", "dtype=float32", "max_new_tokens=30", "stop=[]"]
    results = evaluate(_eval_cfg(tmp_path, *cfg))
    t = results["think"]
    assert (t["n"], t["ok"], t["missing"], t["broken"]) == (4, 4, 0, 0)
    assert results["tasks"]["mcq"]["accuracy"] == 1.0
    rows = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [(r["prediction"], r.get("stop")) for r in rows] == [
        (CUT, "</answer>") if eos_tag else (WHOLE, None)
    ] * 4


# ---------------------------------------------------------------------------------------------- serve
def _sse(base: str, body: dict) -> list[dict]:
    deltas = []
    with httpx.stream("POST", f"{base}/v1/chat/completions", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                deltas += [c["delta"] for c in json.loads(line[6:])["choices"]]
    return deltas


def test_serve_think_gives_reasoning_content_with_special_tags(loaded, song, scripted):
    """serve.py with think=true gave no reasoning_content and the whole text as the content."""
    from musicflamingo.serve import ServeSettings, create_app

    model, processor = loaded
    settings = ServeSettings(model_name=MODEL, max_batch=2, max_completion_tokens=64, max_prompt_tokens=1000)
    app = create_app(model, processor, settings, (299,), ())  # 299: <|im_end|>
    msgs = [user_turn("Tempo?", song)]
    with running_server(app) as base:
        for stop in ([], ["</answer>"]):
            body = {"model": MODEL, "messages": msgs, "max_tokens": 40, "think": True, "stop": stop}
            r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            message = r.json()["choices"][0]["message"]
            assert (message["reasoning_content"], message["content"]) == (THINKING, ANSWER)
            deltas = _sse(base, body)
            reasoning = [d["reasoning_content"] for d in deltas if d.get("reasoning_content")]
            assert "".join(reasoning) == THINKING and not any("<" in d for d in reasoning)
            assert "".join(d.get("content") or "" for d in deltas) == ANSWER
