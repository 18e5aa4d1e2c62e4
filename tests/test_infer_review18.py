"""Review round 18, infer.py / serve.py journey: a chat answer whose stop id completes a stop string, the hint for a
config group set to null, run folders that cannot be made, a file:// audio URL whose name is too long, concurrent
serve requests that end exactly at max_tokens."""

from __future__ import annotations

import io
import json
import os
import threading

import httpx
import pytest
from test_cli_review8 import _refused
from test_infer_review6 import make_cfg
from test_serve import MODEL, QUESTION, ckpt, loaded, server, songs, user_turn  # noqa: F401
from test_think_stop_review16 import force_tokens

from musicflamingo.chat import user_message
from musicflamingo.cli import _refuse_file_as_folder, check_command_line
from musicflamingo.engine import SamplingParams
from musicflamingo.inference import ChatSession, InferenceError, infer, run_chat


@pytest.fixture(autouse=True)
def _no_full_error(monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)


# ---------------------------------------------------------------------------------------------- chat stop id + string
_forced = force_tokens  # the engine picks `ids` in order whatever the tiny model's logits


@pytest.mark.parametrize(
    "stops, want, stop",
    [
        (["\n<|im_end|>"], "4/4", "\n<|im_end|>"),  # the stop id completes the stop string
        (["<|im_end|>"], "4/4\n", "<|im_end|>"),  # the stop id is the stop string
        (["\n"], "4/4", "\n"),  # a stop string before the stop id
        ([], "4/4\n", None),  # the stop id alone
    ],
)
def test_chat_cuts_an_answer_ending_on_a_stop_id_as_infer(
    loaded,  # noqa: F811
    ckpt,  # noqa: F811
    songs,  # noqa: F811
    monkeypatch,
    stops,
    want,
    stop,
):
    """The chat turn's answer (shown, returned, kept in the history and the cache) is infer.py's one-shot answer:
    with stop string "\\n<|im_end|>" and eos <|im_end|> the "\\n" goes; the next turn continues a cache that is a
    from-scratch render of the conversation."""
    model, processor = loaded
    tok = processor.tokenizer
    ids = tok.encode("4/4\n<|im_end|>")
    assert ids[-1] == 299
    _forced(monkeypatch, ids)
    session = ChatSession(
        model, processor, SamplingParams(max_new_tokens=10, stop_ids=(299,), stop_strings=stops)
    )
    shown: list[str] = []
    assert session.ask("Meter?", on_text=shown.append) == want
    assert "".join(shown) == want and session.last_stop == stop
    wav = songs / "songs" / "tone_a.wav"
    one_shot = infer(
        make_cfg(
            f"ckpt={ckpt}", f"audio={wav}", "prompt=Meter?", "max_new_tokens=10", f"stop={json.dumps(stops)}"
        ),
        out=io.StringIO(),
    )
    assert one_shot == [want]
    # the history is the conversation rendered from scratch, the answer as shown, closed by <|im_end|>
    scratch = processor(processor.render_chat(session.messages))["input_ids"][0].tolist()
    assert session.history_ids == scratch[: len(session.history_ids)]
    assert tok.decode(session.history_ids, False).endswith(f"assistant\n{want}<|im_end|>")
    assert session.engine.cache.lengths[0] == len(session.ids)
    assert session.ask("Again?") == want  # the next turn continues the same cache
    assert session.engine.cache.lengths[0] == len(session.ids)


# ---------------------------------------------------------------------------------------------- cli hint
def test_a_group_set_to_null_names_the_form_that_drops_one_entry(capsys):
    """`callbacks=null` said only "to drop the group write ~callbacks", which drops every callback, the checkpoint
    saving too; the line names `~callbacks.<name>` and the entries it takes."""
    line = _refused(capsys, "train", "callbacks=null")
    assert (
        "to drop one of its entries (bad_samples, model_checkpoint, progress_log) write ~callbacks.<name>"
        in line
    )
    assert line.endswith("to drop the group write ~callbacks"), line
    assert check_command_line("train", ["~callbacks.progress_log"]) == []  # what it says to write composes
    line = _refused(capsys, "train", "logger=null", "logger=many")  # the entries of the config chosen
    assert "(csv, tensorboard) write ~logger.<name>" in line, line


# ---------------------------------------------------------------------------------------------- run folders
@pytest.mark.parametrize("config, key", [("train", "hydra.run.dir"), ("eval", "output_dir")])
def test_a_run_folder_that_cannot_be_made_is_one_line_naming_it(tmp_path, capsys, config, key):
    """A name longer than the file system allows, or a path longer than it allows, was a bare OSError traceback
    (ENAMETOOLONG) from the check itself, exit 1."""
    long = tmp_path / ("a" * 300)
    line = _refused(capsys, config, f"{key}={long}")
    assert line.startswith(f"error: {key}={str(long)!r}: the name aaaa") and "over the 255" in line, line
    deep = tmp_path.joinpath(*["b" * 200] * 30)
    line = _refused(capsys, config, f"{key}={deep}")
    assert line.startswith(f"error: {key}={str(deep)!r}: the path is ") and "a path may have" in line, line
    assert not any(tmp_path.iterdir())  # nothing made
    with pytest.raises(
        SystemExit
    ):  # a NUL (from a config file's "\0"): Hydra's ValueError "embedded null byte"
        _refuse_file_as_folder(key, f"{tmp_path}/a\0b")
    assert (
        capsys.readouterr().err
        == f"error: {key}={str(tmp_path) + '/a' + chr(0) + 'b'!r}: a NUL character in the folder's name\n"
    )
    assert check_command_line(config, [f"{key}={tmp_path / 'new' / 'run'}"]) == []


# ---------------------------------------------------------------------------------------------- serve
def test_a_file_url_with_a_name_too_long_is_a_400_naming_the_field(server, songs):  # noqa: F811
    """The server answered 500 "internal error: OSError: [Errno 36] File name too long"."""
    url = (songs / "songs" / ("a" * 300 + ".wav")).as_uri()
    body = {
        "model": MODEL,
        "messages": [user_turn(QUESTION, part={"type": "audio_url", "audio_url": {"url": url}})],
        "max_tokens": 4,
    }
    r = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (
        err["param"] == "messages[0].content[0].audio_url.url" and "File name too long" in err["message"]
    ), err
    assert err["code"] == "file_not_found"


def test_concurrent_streamed_and_whole_answers_ending_at_max_tokens(server, songs):  # noqa: F811
    """Streaming and non-streaming requests decoded together, each cut exactly at its max_tokens: the same text
    as alone, finish_reason length, completion_tokens = max_tokens."""
    wav = songs / "songs" / "tone_a.wav"

    def body(n: int, stream: bool) -> dict:
        b = {"model": MODEL, "messages": [user_turn(QUESTION, wav)], "max_tokens": n, "stream": stream}
        return {**b, "stream_options": {"include_usage": True}} if stream else b

    def whole(n: int) -> tuple[str, str, int]:
        r = httpx.post(f"{server}/v1/chat/completions", json=body(n, False), timeout=120).json()
        return (
            r["choices"][0]["message"]["content"],
            r["choices"][0]["finish_reason"],
            r["usage"]["completion_tokens"],
        )

    def streamed(n: int) -> tuple[str, str, int]:
        text, reason, used = "", None, None
        with httpx.stream("POST", f"{server}/v1/chat/completions", json=body(n, True), timeout=120) as r:
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: ") :])
                for choice in chunk.get("choices", []):
                    text += choice["delta"].get("content") or ""
                    reason = choice.get("finish_reason") or reason
                if chunk.get("usage"):
                    used = chunk["usage"]["completion_tokens"]
        return text, reason, used

    alone = {n: whole(n) for n in (3, 7)}
    assert all(a[1:] == ("length", n) for n, a in alone.items()), alone
    got: dict[tuple[int, bool], tuple[str, str, int]] = {}
    jobs = [(n, s) for n in (3, 7) for s in (False, True)] * 2

    def run(k: int, n: int, s: bool) -> None:
        got[k, n, s] = streamed(n) if s else whole(n)

    threads = [threading.Thread(target=run, args=(k, n, s)) for k, (n, s) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(got) == len(jobs)
    for (_, n, s), answer in got.items():
        assert answer == alone[n], (n, s, answer, alone[n])
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200


def test_stop_id_at_the_last_allowed_token_is_a_stop(server, songs, monkeypatch, loaded):  # noqa: F811
    """An answer whose stop id is its max_tokens-th token ended on its own: finish_reason stop, not length."""
    tok = loaded[1].tokenizer
    ids = tok.encode("4/4<|im_end|>")
    _forced(monkeypatch, ids)
    wav = songs / "songs" / "tone_a.wav"
    body = {"model": MODEL, "messages": [user_turn(QUESTION, wav)], "max_tokens": len(ids)}
    r = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60).json()
    assert (r["choices"][0]["message"]["content"], r["choices"][0]["finish_reason"]) == ("4/4", "stop"), r
    r = httpx.post(
        f"{server}/v1/chat/completions", json={**body, "max_tokens": len(ids) - 1}, timeout=60
    ).json()
    assert (r["choices"][0]["message"]["content"], r["choices"][0]["finish_reason"]) == ("4/4", "length"), r


# ---------------------------------------------------------------------------------------------- chat at its limits
def test_chat_says_when_an_answer_stopped_at_the_token_limit_or_the_context(loaded, monkeypatch):  # noqa: F811
    """infer.py's batch warns that an answer cut at the token limit may be cut short; the chat printed the cut
    answer as a whole one. A first question that does not fit the context alone was told to /reset, which asks it
    again."""
    model, processor = loaded
    asked = processor(processor.render_chat([user_message("Key?")], add_generation_prompt=True))["input_ids"]
    prompt = asked.shape[-1]
    out = io.StringIO()
    session = ChatSession(model, processor, SamplingParams(max_new_tokens=3, stop_ids=()))
    assert len(run_chat(session, ["Key?"], out=out)) == 1
    assert "(the answer may be cut short: it stopped at max_new_tokens=3: raise it" in out.getvalue()
    # the context ends before max_new_tokens: the note says so, and the next turn is told to /reset
    monkeypatch.setattr(model.config.text, "max_position_embeddings", prompt + 4)
    out = io.StringIO()
    session = ChatSession(model, processor, SamplingParams(max_new_tokens=50, stop_ids=()))
    answers = run_chat(session, ["Key?", "Tempo?", "/reset", "Key?"], out=out)
    text = out.getvalue()
    assert len(answers) == 2 and len(session.last_new_ids) == 4, text
    assert text.count(f"it stopped at the end of the model's context ({prompt + 4} positions)") == 2, text
    assert "max_new_tokens=50" not in text and "start a new conversation (/reset)" in text
    # a first question past the context: /reset cannot help
    monkeypatch.setattr(model.config.text, "max_position_embeddings", prompt - 2)
    out = io.StringIO()
    session = ChatSession(model, processor, SamplingParams(max_new_tokens=5, stop_ids=()))
    assert run_chat(session, ["Key?"], out=out) == []
    assert "alone does not fit, /reset cannot help; shorten it" in out.getvalue(), out.getvalue()
    assert "start a new conversation" not in out.getvalue()


def test_a_stream_cut_at_max_tokens_on_a_held_back_stop_prefix_shows_it(server, songs, monkeypatch, loaded):  # noqa: F811
    """The last allowed token starts a stop string ("\\n" of "\\n\\n"): held back while it could grow, then shown
    once the answer ends at max_tokens, streamed as whole."""
    tok = loaded[1].tokenizer
    ids = tok.encode("4/4\n\nmore")
    n = len(tok.encode("4/4\n"))
    _forced(monkeypatch, ids)
    body = {
        "model": MODEL,
        "messages": [user_turn(QUESTION, songs / "songs" / "tone_a.wav")],
        "max_tokens": n,
        "stop": ["\n\n"],
    }
    r = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60).json()
    assert (r["choices"][0]["message"]["content"], r["choices"][0]["finish_reason"]) == ("4/4\n", "length"), r
    text = ""
    with httpx.stream(
        "POST", f"{server}/v1/chat/completions", json={**body, "stream": True}, timeout=60
    ) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    text += choice["delta"].get("content") or ""
    assert text == "4/4\n"
    r = httpx.post(f"{server}/v1/chat/completions", json={**body, "max_tokens": n + 1}, timeout=60).json()
    assert (r["choices"][0]["message"]["content"], r["choices"][0]["finish_reason"]) == ("4/4", "stop"), r


# ---------------------------------------------------------------------------------------------- output=
def test_output_naming_a_folder_is_refused_naming_the_file_to_give(ckpt, songs, tmp_path):  # noqa: F811
    """`output=results/` (a folder that does not exist yet) wrote the answers into a file named `results`; an
    existing folder said only "not a regular file"."""
    wav = songs / "songs" / "tone_a.wav"
    (tmp_path / "existing").mkdir()
    for folder in (f"{tmp_path / 'results'}/", str(tmp_path / "existing"), f"{tmp_path / 'existing'}/"):
        cfg = make_cfg(f"ckpt={ckpt}", f"audio={wav}", "max_new_tokens=2", f"output={folder}")
        with pytest.raises(InferenceError) as e:
            infer(cfg, out=io.StringIO())
        assert str(e.value) == (
            f"output={folder}: a folder; output= names the .jsonl file the answers go in "
            f"(output={folder.rstrip('/')}/answers.jsonl)"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"] and not any(
        (tmp_path / "existing").iterdir()
    )
    path = tmp_path / "new" / "answers.jsonl"  # a file in a folder not there yet: made
    infer(make_cfg(f"ckpt={ckpt}", f"audio={wav}", "max_new_tokens=2", f"output={path}"), out=io.StringIO())
    assert len(path.read_text().splitlines()) == 1


# ---------------------------------------------------------------------------------------------- serve settings
def test_serve_settings_refuse_an_empty_host_and_take_any_api_key_env():
    """`host=` (empty) served on every interface (with only a warning naming an empty host); `api_key_env=5` was a
    TypeError traceback from os.environ."""
    from musicflamingo.serve.settings import ServeConfigError, ServeSettings

    for host in ("", "  "):
        with pytest.raises(ServeConfigError, match=r"host must be an address or host name \(127.0.0.1"):
            ServeSettings.from_cfg({"host": host})
    assert ServeSettings.from_cfg({"host": "0.0.0.0"}).host == "0.0.0.0"
    assert ServeSettings.from_cfg({"api_key_env": 5}).api_key is None


@pytest.mark.parametrize(
    "config, argv, line",
    [
        (
            "infer",
            ["ckpt=m", "song.wav"],
            "error: song.wav: not a setting; write audio=song.wav for the audio",
        ),
        ("infer", ["--audio", "song.wav"], "error: song.wav: not a setting; write audio=song.wav (no --)"),
        (
            "infer",
            ["ckpt=m", "prompt=What", "is", "the", "key?", "audio=a.wav"],
            """error: is: not a setting; a value with spaces goes in quotes: 'prompt="What is the key?"'""",
        ),
        ("train", ["experiment=lora", "fast"], "error: fast: not a setting; each setting is key=value"),
    ],
)
def test_a_word_without_equals_is_one_line_saying_what_to_write(capsys, config, argv, line):
    """`infer.py song.wav` (or `--audio song.wav`, or a prompt the shell split at its spaces) was Hydra's "Error
    parsing override 'song.wav' missing EQUAL at '<EOF>'", exit 1."""
    assert _refused(capsys, config, *argv) == line


def test_hydra_flags_and_their_values_still_pass():
    for argv in (
        ["--cfg", "job"],
        ["--info", "config"],
        ["-cn", "infer", "--cfg", "job"],
        ["-c", "all", "ckpt=m"],
    ):
        check_command_line("infer", argv)


def test_chat_questions_piped_from_a_windows_file_lose_the_bom_and_crlf(monkeypatch):
    """`infer.py interactive=true < questions.txt` saved by a Windows editor: a BOM, CRLF line ends and blank lines.
    The BOM went into the first question as U+FEFF (other tokens, another answer, silently)."""
    from musicflamingo import inference

    read, write = os.pipe()
    os.write(write, b"\xef\xbb\xbfWhat key?\r\n\r\n\r\nAnd the tempo?\r\nlast\r")
    os.close(write)

    class Piped:
        def isatty(self) -> bool:
            return False

        def fileno(self) -> int:
            return read

    monkeypatch.setattr(inference.sys, "stdin", Piped())
    try:
        lines = list(inference._stdin_lines())
    finally:
        os.close(read)
    assert [x.strip() for x in lines if x.strip()] == ["What key?", "And the tempo?", "last"]
    assert lines[0] == "What key?"
