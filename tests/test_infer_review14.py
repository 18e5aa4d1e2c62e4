"""infer.py journey, review 14: stop strings (engine, generate, infer, chat), a seeded chat's turns, a finished
output= run whose audio has moved."""

from __future__ import annotations

import io
import json
import logging
import shutil

import pytest
import torch
from test_infer_review6 import ckpt, make_cfg, song  # noqa: F401  (fixtures)
from tiny_assets import make_tone, write_audio, write_tiny_tokenizer

from musicflamingo.engine import AnswerText, Engine, Request, SamplingParams, generate
from musicflamingo.inference import ChatSession, InferenceError, infer, load_model, stop_strings
from musicflamingo.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(write_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def loaded(ckpt):  # noqa: F811
    return load_model(ckpt, "cpu", "float32")


# ------------------------------------------------------------------------------------------------ AnswerText
def _stream(tok, text: str, stops, show: list[str] | None = None) -> tuple[AnswerText, int]:
    """Push `text`'s tokens until a stop string ends it; returns the answer and the number of tokens pushed."""
    answer = AnswerText(tok, stops)
    ids = tok.encode(text)
    for n, t in enumerate(ids, 1):
        hit = answer.push(t)
        if show is not None:
            show.append(answer.text)
        if hit:
            return answer, n
    answer.finish()
    return answer, len(ids)


def test_a_stop_string_spanning_two_tokens_ends_the_answer_at_the_second(tok):
    text = "The tempo is 96 BPM.\n\nKey: C major"
    ids = tok.encode(text)
    first_break = [tok.decode([t]) for t in ids].index("\n")
    assert tok.decode(ids[first_break + 1 : first_break + 2]) == "\n"  # "\n\n" is two tokens here
    shown: list[str] = []
    answer, n = _stream(tok, text, ["\n\n"], shown)
    assert n == first_break + 2 and answer.stop == "\n\n"
    assert answer.text == "The tempo is 96 BPM."
    # the first "\n" was held back (it could start the stop string): never shown
    assert all("\n" not in s for s in shown) and shown[first_break] == "The tempo is 96 BPM."
    assert all(later.startswith(earlier) for earlier, later in zip(shown, shown[1:]))
    assert answer.kept_tokens() == first_break  # tokens before the cut


def test_a_held_back_start_that_is_no_stop_string_is_released(tok):
    shown: list[str] = []
    answer, _ = _stream(tok, "hello world EN here", ["END"], shown)
    assert answer.stop is None and answer.text == "hello world EN here"
    pieces = [tok.decode([t]) for t in tok.encode("hello world EN here")]
    at = pieces.index("E")
    assert pieces[at + 1 : at + 3] == ["N", " "]
    # "E" and "EN" could start "END": held back until the " " after them
    assert shown[at] == shown[at + 1] == "hello world " and shown[at + 2] == "hello world EN "
    answer, _ = _stream(tok, "hello world EN", ["END"])  # the answer ends on the held-back start
    assert answer.stop is None and answer.text == "hello world EN"


def test_the_first_stop_string_to_appear_cuts_and_a_multibyte_character_can_stop(tok):
    answer, _ = _stream(tok, "hello world END here xyz", ["xyz", "END"])
    assert answer.stop == "END" and answer.text == "hello world "
    ids = tok.encode("café au lait")
    assert tok.decode(ids[3:4]) == "\ufffd"  # é is two byte tokens
    answer, n = _stream(tok, "café au lait", ["é"])
    assert answer.text == "caf" and n == 5 and answer.kept_tokens() == 3


def test_a_special_token_as_stop_string_matches_that_token(tok):
    """Decoded text leaves special tokens out: stop="<|im_start|>" (the model starting another turn) never matched."""
    answer, n = _stream(tok, "hello wor<|im_start|>user", ["<|im_start|>", "xyz"])
    assert answer.stop == "<|im_start|>" and answer.text == "hello wor"
    assert n == len(tok.encode("hello wor")) + 1 and answer.kept_tokens() == n - 1


def test_stop_strings_are_checked():
    with pytest.raises(ValueError, match="empty stop string"):
        SamplingParams(stop_strings=("",))
    with pytest.raises(ValueError, match="stop_strings must be a text or a list of texts"):
        SamplingParams(stop_strings=(1,))
    assert SamplingParams(stop_strings="###").stop_strings == ("###",)
    assert stop_strings(r"a\n\tb\\n", escapes=True) == ("a\n\tb\\n",)  # Hydra keeps \n as typed
    assert stop_strings(["x", 42]) == ("x", "42")
    with pytest.raises(InferenceError, match=r"stop=\[\] \(or null\) for none"):
        stop_strings("")


# ------------------------------------------------------------------------------------------------ engine
def _two_token_stop(tok, tokens: list[int], at: int, typed: bool = False) -> str:
    """A stop string of the last character of token at-1 and the first of token `at`, at its first occurrence
    there (moved on to the next boundary where either token decodes to nothing or it occurs earlier; `typed`: or
    it is not plain text for a command line)."""
    for j in range(1 if typed else at, len(tokens)):
        before, after = tok.decode(tokens[:j]), tok.decode(tokens[: j + 1])
        if before and len(after) > len(before) and after.startswith(before) and "\ufffd" not in after[-3:]:
            stop = after[len(before) - 1 : len(before) + 1]
            plain = stop.isalnum() or stop.replace(" ", "").isalnum()
            if after.find(stop) == len(before) - 1 and (plain or not typed):
                return stop
    raise AssertionError("no two-token stop string in this answer")


def _run_free(model, tok, prompts, params):
    engine = Engine(model, slots=len(prompts), tokenizer=tok)
    slots = [engine.admit(Request(torch.tensor(tok.encode(p)), params)) for p in prompts]
    while engine.decoding:
        engine.step()
    return [s.tokens for s in slots]


def test_batch_rows_stop_at_their_own_stop_strings_at_different_steps(loaded):
    model, processor = loaded
    tok = processor.tokenizer
    prompts = ["hello there", "what key is it"]
    free = _run_free(model, tok, prompts, SamplingParams(max_new_tokens=20))
    stops = [_two_token_stop(tok, free[0], 6), _two_token_stop(tok, free[1], 3)]
    engine = Engine(model, slots=2, tokenizer=tok)
    slots = [
        engine.admit(
            Request(torch.tensor(tok.encode(p)), SamplingParams(max_new_tokens=20, stop_strings=(s,)))
        )
        for p, s in zip(prompts, stops)
    ]
    steps = {0: None, 1: None}
    shown = {0: [], 1: []}
    n = 0
    while engine.decoding:
        n += 1
        for index, _ in engine.step():
            shown[index].append(slots[index].text.text)
            if slots[index].done:
                steps[index] = n
    for row, (s, stop) in enumerate(zip(slots, stops)):
        full = tok.decode(free[row])
        want = full[: full.find(stop)]
        end = next(k for k in range(1, 21) if stop in tok.decode(free[row][:k]))
        assert s.tokens == free[row][:end], "the row ends at the token that completes its stop string"
        assert s.text.text == want and s.text.stop == stop and s.finish_reason == "stop"
        assert all(want.startswith(x) for x in shown[row]), "a streamed piece of the stop string"
    assert steps[0] != steps[1]


def test_generate_stops_rows_on_stop_strings_with_the_tokenizer(loaded):
    model, processor = loaded
    tok = processor.tokenizer
    ids = torch.tensor([tok.encode("hello there"), tok.encode("hello there")])
    free = generate(model, ids, max_new_tokens=20, stop_token_ids=[])[:, ids.shape[1] :].tolist()
    stop = _two_token_stop(tok, free[0], 5)
    out = generate(model, ids, max_new_tokens=20, stop_token_ids=[], stop_strings=[stop], tokenizer=tok)
    new = out[:, ids.shape[1] :].tolist()
    end = next(k for k in range(1, 21) if stop in tok.decode(free[0][:k]))
    assert len(new[0]) == end and new[0] == free[0][:end]
    with pytest.raises(ValueError, match="pass the tokenizer too"):
        generate(model, ids, max_new_tokens=4, stop_strings=[stop])
    with pytest.raises(ValueError, match="needs the tokenizer"):
        Engine(model).admit(Request(ids[0], SamplingParams(stop_strings=("x",))))


# ------------------------------------------------------------------------------------------------ infer.py
def _with_generation(src, dst, **fields):
    shutil.copytree(src, dst)
    path = dst / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    return dst


def test_infer_cuts_answers_before_stop_strings_and_reads_them_from_generation_config(
    ckpt,  # noqa: F811
    song,  # noqa: F811
    loaded,
    tmp_path,
    caplog,
):
    """`stop=` was refused and generation_config.json's stop_strings named as not implemented."""
    tok = loaded[1].tokenizer
    base = [f"audio=[{song},{song}]", "prompt=[a,b]", "max_new_tokens=16", "stream=true"]
    free = infer(make_cfg(f"ckpt={ckpt}", *base), out=io.StringIO())
    toks = tok.encode(free[0])
    stop = _two_token_stop(tok, toks, 4, typed=True)
    want = [f[: f.find(stop)] if stop in f else f for f in free]
    printed = io.StringIO()
    path = tmp_path / "answers.jsonl"
    got = infer(make_cfg(f"ckpt={ckpt}", *base, f"stop='{stop}'", f"output={path}"), out=printed)
    assert got == want and stop not in printed.getvalue()
    assert want[0] != free[0]
    assert [json.loads(x)["answer"] for x in path.read_text().splitlines()] == want
    # a rerun without the stop string asks again: the file's cut answers are not this run's
    assert infer(make_cfg(f"ckpt={ckpt}", *base, f"output={path}"), out=io.StringIO()) == free
    assert [json.loads(x).get("stop") for x in path.read_text().splitlines()] == [[stop], [stop], None, None]
    # the checkpoint's file says the same
    folder = _with_generation(ckpt, tmp_path / "ckpt", stop_strings=stop)
    with caplog.at_level(logging.WARNING):
        assert infer(make_cfg(f"ckpt={folder}", *base), out=io.StringIO()) == want
    assert "stop_strings" not in caplog.text
    assert infer(make_cfg(f"ckpt={folder}", *base, "stop=[]"), out=io.StringIO()) == free
    with pytest.raises(InferenceError, match="empty stop string"):
        infer(make_cfg(f"ckpt={ckpt}", *base, "stop="), out=io.StringIO())


# ------------------------------------------------------------------------------------------------ chat
def test_chat_answer_cut_by_a_stop_string_leaves_the_cache_as_its_history(loaded):
    """The cut answer's tokens after the cut are dropped from the cache; the history holds the text the user saw,
    closed with <|im_end|>, and the next turn decodes as a fresh run over that history."""
    model, processor = loaded
    tok = processor.tokenizer
    params = SamplingParams(max_new_tokens=16, stop_ids=(299,))
    free = ChatSession(model, processor, params)
    free.ask("hello there")
    stop = _two_token_stop(tok, free.last_new_ids, 5)
    session = ChatSession(
        model, processor, SamplingParams(max_new_tokens=16, stop_ids=(299,), stop_strings=(stop,))
    )
    shown: list[str] = []
    answer = session.ask("hello there", on_text=shown.append)
    assert answer == tok.decode(free.last_new_ids)[: tok.decode(free.last_new_ids).find(stop)]
    assert "".join(shown) == answer
    assert tok.decode(session.history_ids).endswith(answer) and session.pending[-1] == 299
    assert session.engine.cache.lengths[0] == len(session.ids)
    session.params = SamplingParams(max_new_tokens=16, stop_ids=(299,))  # the second answer whole
    second = session.ask("and then")
    asked = len(session.ids) - (len(session.last_new_ids) - 1)  # the tokens before the second answer
    fresh = Engine(model, tokenizer=tok)
    slot = fresh.admit(Request(torch.tensor(session.ids[:asked]), session.params))
    while fresh.decoding:
        fresh.step()
    assert slot.tokens == session.last_new_ids and slot.text.text == second


def test_seeded_chat_turns_sample_their_own_streams_and_the_chat_repeats(loaded):
    """Every turn re-seeded its generator from `seed`: near-uniform sampling gave each turn the same tokens."""
    model, processor = loaded
    params = SamplingParams(max_new_tokens=8, do_sample=True, temperature=10000.0, seed=0)

    def chat():
        session = ChatSession(model, processor, params)
        turns = []
        for q in ("a", "a", "a"):
            session.ask(q)
            turns.append(list(session.last_new_ids))
        return turns

    turns = chat()
    assert turns[0] != turns[1] and turns[1] != turns[2]
    assert chat() == turns


# ------------------------------------------------------------------------------------------------ output=
def test_a_finished_output_run_whose_audio_moved_says_so_and_exits_0(ckpt, tmp_path, caplog):  # noqa: F811
    """A rerun of a finished run was refused: its audio files had moved ('audio file not found')."""
    a = write_audio(tmp_path / "a.wav", make_tone(440, 0.5))
    b = write_audio(tmp_path / "b.wav", make_tone(660, 0.5))
    items = tmp_path / "items.jsonl"
    items.write_text(f'{{"audio": "{a.name}", "prompt": "key?"}}\n{{"audio": "{b.name}"}}\n')
    path = tmp_path / "answers.jsonl"
    settings = [f"ckpt={ckpt}", f"audio={items}", "max_new_tokens=3", f"output={path}"]
    answers = infer(make_cfg(*settings), out=io.StringIO())
    a.unlink()
    b.unlink()
    with caplog.at_level(logging.INFO, logger="musicflamingo.inference"):
        assert infer(make_cfg(*settings), out=io.StringIO()) == answers
    assert "holds the answers to all 2 inputs" in caplog.text
    # an input still to answer whose file is gone is named with its line
    items.write_text(items.read_text() + f'{{"audio": "{b.name}", "prompt": "tempo?"}}\n')
    with pytest.raises(Exception, match=r"items.jsonl:3: .*b.wav: audio file not found"):
        infer(make_cfg(*settings), out=io.StringIO())


def test_output_naming_the_items_list_refuses_it_without_cutting_its_last_line(ckpt, song, tmp_path):  # noqa: F811
    """output=items.jsonl (the input list, its last line without a newline) lost that item: a line that began like
    our rows and had no answer was taken for a torn write and cut off before the file was refused."""
    items = tmp_path / "items.jsonl"
    text = f'{{"audio": "{song}", "prompt": "key?"}}\n{{"audio": "{song}", "prompt": "tempo?"}}'
    items.write_text(text)
    with pytest.raises(
        InferenceError, match=r"items.jsonl:1: expected a JSON object with audio, prompt and answer"
    ):
        infer(
            make_cfg(f"ckpt={ckpt}", f"audio={items}", "max_new_tokens=2", f"output={items}"),
            out=io.StringIO(),
        )
    assert items.read_text() == text
