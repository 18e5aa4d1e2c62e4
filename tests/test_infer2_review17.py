"""Review round 17 (second infer/serve pass): a researcher captions songs greedily, then sampled, into one file.

infer.py output=: rows did not name how they were sampled, so `do_sample=true temperature=0.7 seed=0` into the
greedy run's file was handed the greedy captions as "already answered" (and a greedy rerun the samples). A sampled
row names do_sample, temperature, top_k, top_p and seed now, and only a run sampling the same way reuses it; a row
without them (every row written before) is a greedy answer.

Stop strings (infer, eval, serve: `engine.AnswerText`): one holding a special token's text with other text
(`"\\n<|im_start|>"`) never matched, as decoded text leaves special tokens out; the reference's `stop_strings` read
a special token as its text and stop there. It matches where the reference's does now.

infer.py output=: a rerun naming the same files another way (`music/a.wav` then an absolute path, or from another
folder) asked every input again; rows name the resolved file now, and `a.wav` in another folder is another file.

serve.py: `n: 2` was refused with `code: null`; it is an `unsupported_parameter`, as the others.
"""

from __future__ import annotations

import io
import json
import shutil

import pytest
from test_infer import audios, ckpt, loaded, make_cfg  # noqa: F401
from tiny_assets import write_tiny_tokenizer

from musicflamingo import inference
from musicflamingo.engine import AnswerText
from musicflamingo.inference import infer
from musicflamingo.tokenizer import load_tokenizer


@pytest.fixture
def once(loaded, monkeypatch):  # noqa: F811
    """infer() runs on the module's loaded model instead of loading the checkpoint at every call."""
    monkeypatch.setattr(inference, "load_model", lambda *args, **kwargs: loaded)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------- infer.py output=
def test_sampled_and_greedy_rows_are_reused_only_by_a_run_asking_the_same_way(ckpt, audios, once, tmp_path):  # noqa: F811
    out = tmp_path / "caps.jsonl"
    base = [f"ckpt={ckpt}", f"audio={audios[0]}", "max_new_tokens=4", "stream=false"]
    sampled = ["do_sample=true", "temperature=0.7", "seed=0"]
    greedy = infer(make_cfg(*base, f"output={out}"), out=io.StringIO())
    assert all("do_sample" not in r for r in _rows(out))  # a greedy row names no sampling
    samples = infer(make_cfg(*base, *sampled, f"output={out}"), out=io.StringIO())
    # asked again (were the greedy captions), and the same samples as a run without output=
    assert samples == infer(make_cfg(*base, *sampled), out=io.StringIO()) and samples != greedy
    rows = _rows(out)
    assert len(rows) == 2
    assert [
        (r.get("do_sample"), r.get("temperature"), r.get("top_k"), r.get("top_p"), r.get("seed"))
        for r in rows
    ] == [
        (None,) * 5,
        (True, 0.7, 0, 1.0, 0),
    ]
    # each kind reads its own rows back, asking nothing
    assert infer(make_cfg(*base, *sampled, f"output={out}"), out=io.StringIO()) == samples
    assert infer(make_cfg(*base, f"output={out}"), out=io.StringIO()) == greedy
    assert len(_rows(out)) == 2
    # another seed (or temperature) is another question
    infer(make_cfg(*base, "do_sample=true", "temperature=0.7", "seed=1", f"output={out}"), out=io.StringIO())
    assert [r.get("seed") for r in _rows(out)] == [None, 0, 1]


def test_rows_written_before_rows_named_their_sampling_are_greedy_answers(ckpt, audios, once, tmp_path):  # noqa: F811
    out = tmp_path / "caps.jsonl"
    base = [f"ckpt={ckpt}", f"audio={audios[0]}", "max_new_tokens=4", "stream=false", f"output={out}"]
    prompt = inference.DEFAULT_PROMPT
    out.write_text(json.dumps({"audio": str(audios[0]), "prompt": prompt, "answer": "an old caption"}) + "\n")
    assert infer(make_cfg(*base), out=io.StringIO()) == ["an old caption"]  # greedy: reused, as before
    assert infer(make_cfg(*base, "do_sample=true", "seed=3"), out=io.StringIO()) != ["an old caption"]
    assert len(_rows(out)) == 2


def test_a_rerun_naming_the_files_another_way_reuses_their_rows(ckpt, audios, once, tmp_path, monkeypatch):  # noqa: F811
    for name in ("one", "two"):
        (tmp_path / name / "music").mkdir(parents=True)
    shutil.copy(audios[0], tmp_path / "one" / "music" / "a.wav")
    shutil.copy(audios[1], tmp_path / "two" / "music" / "a.wav")  # another song, the same relative name
    out = tmp_path / "caps.jsonl"
    base = [f"ckpt={ckpt}", "max_new_tokens=3", "stream=false", f"output={out}"]
    monkeypatch.chdir(tmp_path / "one")
    first = infer(make_cfg(*base, "audio=music/a.wav"), out=io.StringIO())
    assert _rows(out)[0]["audio"] == "music/a.wav"  # as given
    # the same file by another name, or from another folder: already answered
    assert infer(make_cfg(*base, "audio=./music/a.wav"), out=io.StringIO()) == first
    monkeypatch.chdir(tmp_path)
    assert infer(make_cfg(*base, f"audio={tmp_path}/one/music/a.wav"), out=io.StringIO()) == first
    assert infer(make_cfg(*base, "audio=one/music/../music/a.wav"), out=io.StringIO()) == first
    assert len(_rows(out)) == 1
    # music/a.wav from another folder is another song: asked
    monkeypatch.chdir(tmp_path / "two")
    infer(make_cfg(*base, "audio=music/a.wav"), out=io.StringIO())
    assert len(_rows(out)) == 2 and _rows(out)[1]["resolved_audio"] == str(
        (tmp_path / "two/music/a.wav").resolve()
    )
    # a moved project: its rows' files are gone, so they are matched by the names given, as before
    (tmp_path / "one").rename(tmp_path / "moved")
    monkeypatch.chdir(tmp_path / "moved")
    assert infer(make_cfg(*base, "audio=music/a.wav"), out=io.StringIO()) == first and len(_rows(out)) == 2
    # one file named two ways in one run is one song asked twice: two samples, each rerun reading its own
    sampled = [*base, "do_sample=true", "seed=5", "audio=[music/a.wav,./music/a.wav]"]
    twice = infer(make_cfg(*sampled), out=io.StringIO())
    assert twice[0] != twice[1] and [r.get("repeat") for r in _rows(out)[2:]] in ([0, 1], [1, 0])
    assert infer(make_cfg(*sampled), out=io.StringIO()) == twice and len(_rows(out)) == 4


# ---------------------------------------------------------------------------------------------- stop strings
def _first_stop(tok, ids, stops):
    """(tokens pushed when the answer ended, its text, the stop string) of `ids` pushed into an AnswerText."""
    answer = AnswerText(tok, stops)
    for n, t in enumerate(ids, 1):
        if answer.push(t):
            return n, answer.text, answer.stop
    answer.finish()
    return None, answer.text, answer.stop


@pytest.mark.parametrize(
    "text, stops, cut",
    [
        ("hello\n<|im_start|>user more", ["\n<|im_start|>"], "hello"),  # text, then the special token
        ("hi<|im_start|>user\nmore", ["<|im_start|>user"], "hi"),  # the special token, then text
        ("hi<|im_start|>assistant then\n<|im_start|>user", ["<|im_start|>user"], "hiassistant then\n"),
        ("ab<|im_end|>\n<|im_start|>x", ["<|im_end|>\n<|im_start|>", "zz"], "ab"),  # two specials
        ("a <|im_start|>b", ["\n<|im_start|>", "<|im_start|>"], "a "),  # the special token alone still stops
        ("no stop <|im_start|>here", ["\n<|im_start|>"], "no stop here"),  # special left out of the text
    ],
)
def test_a_stop_string_mixing_a_special_token_with_text_ends_where_the_reference_does(
    tok_dir, text, stops, cut
):
    tok = load_tokenizer(tok_dir)
    ids = tok.encode(text)
    n, answer, stop = _first_stop(tok, ids, stops)
    assert answer == cut, (answer, stop)
    ended = None
    try:
        import transformers
    except ImportError:
        pass
    else:  # the reference's stop_strings: the token after which generate() stops
        import torch

        criteria = transformers.StopStringCriteria(
            transformers.AutoTokenizer.from_pretrained(str(tok_dir)), stops
        )
        row = torch.tensor([ids])
        ended = next((k for k in range(1, len(ids) + 1) if criteria(row[:, :k], None).item()), None)
        assert n == ended, (n, ended)
    if n is not None:
        assert stop in stops and tok.decode(ids[:n]).startswith(cut)
    else:
        assert answer == tok.decode(ids)  # nothing matched: the skip-special decode, as before


# ---------------------------------------------------------------------------------------------- serve.py
def test_n_over_one_is_refused_as_an_unsupported_parameter():
    """`n: 2` was a 400 with `code: null`, where every other value this server does not implement (`logprobs:
    true`, `tools: [...]`) says `unsupported_parameter`, which clients branch on."""
    from musicflamingo.serve.errors import APIError
    from musicflamingo.serve.protocol import parse_chat_request
    from musicflamingo.serve.settings import ServeSettings

    settings = ServeSettings(model_name="m", max_completion_tokens=64, max_prompt_tokens=1000)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    for field, value in (("n", 2), ("n", True), ("logprobs", True)):
        with pytest.raises(APIError) as e:
            parse_chat_request({**body, field: value}, settings)
        err = e.value.body()["error"]
        assert (e.value.status, err["param"], err["code"]) == (400, field, "unsupported_parameter"), err
    assert parse_chat_request({**body, "n": 1}, settings).messages[0].text == "hi"
