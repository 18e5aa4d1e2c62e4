"""infer.py journey, review 13: resumed output= files of repeated inputs, JSONL lists of (audio, prompt) items,
batched answers against one-at-a-time ones."""

from __future__ import annotations

import io
import json
import logging
import re

import pytest
from test_infer_review6 import ckpt, make_cfg, song  # noqa: F401  (fixtures)

from musicflamingo import inference
from musicflamingo.inference import infer


# ------------------------------------------------------------------------------------------------ output= resume
def test_resumed_repeats_of_one_song_keep_each_inputs_own_sample(ckpt, song, tmp_path, monkeypatch):  # noqa: F811
    """audio=[s,s,s,s] with seeded sampling gives each copy its own (seed, i) sample, written as it finishes, so not
    in input order. After Ctrl-C the rerun matched the file's rows to the copies in file order: copy 0 got the
    sample of the copy that had finished first, that copy was asked again, and the file held one sample twice and
    lost another, silently. Rows of a repeated pair now carry their repeat number."""
    settings = [
        f"ckpt={ckpt}",
        f"audio=[{song},{song},{song},{song}]",
        "do_sample=true",
        "temperature=100",  # near uniform: the end token comes at random lengths
        "seed=0",
        "max_new_tokens=100",
        "batch_size=4",
    ]
    straight = infer(make_cfg(*settings), out=io.StringIO())
    assert len(set(straight)) == 4

    path = tmp_path / "answers.jsonl"
    write = inference._Output.write

    def write_once_then_ctrl_c(self, *args, **kwargs):
        write(self, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(inference._Output, "write", write_once_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        infer(make_cfg(*settings, f"output={path}"), out=io.StringIO())
    (first,) = [json.loads(x) for x in path.read_text().splitlines()]
    assert first["answer"] != straight[0], "the first answer done must be another copy's for this test"
    monkeypatch.setattr(inference._Output, "write", write)

    resumed = infer(make_cfg(*settings, f"output={path}"), out=io.StringIO())
    assert resumed == straight
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert sorted(r["answer"] for r in rows) == sorted(straight)
    assert sorted(r["repeat"] for r in rows) == [0, 1, 2, 3]
    assert infer(make_cfg(*settings, f"output={path}"), out=io.StringIO()) == straight  # nothing asked again


def test_ctrl_c_says_what_output_keeps_and_how_to_go_on(ckpt, song, tmp_path, monkeypatch, caplog):  # noqa: F811
    """Ctrl-C mid-batch printed an empty line: nothing said that the finished answers are kept, nor how to go on."""
    path = tmp_path / "answers.jsonl"
    settings = [f"ckpt={ckpt}", f"audio=[{song},{song},{song}]", "prompt=[a,b,c]", "max_new_tokens=2"]
    write = inference._Output.write

    def write_once_then_ctrl_c(self, *args, **kwargs):
        write(self, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(inference._Output, "write", write_once_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt), caplog.at_level(logging.WARNING, logger="musicflamingo.inference"):
        infer(make_cfg(*settings, f"output={path}"), out=io.StringIO())
    assert f"stopped: 1 of 3 answers are in {path}; the same command asks only the others" in caplog.text
    assert len(path.read_text().splitlines()) == 1 and not (tmp_path / "answers.jsonl.lock").exists()


def test_rows_of_a_pair_asked_once_have_no_repeat_and_are_reused_first(ckpt, song, tmp_path):  # noqa: F811
    """A pair asked once writes the row as before (no `repeat`); a later run asking it twice reuses that row for
    the first time and asks only the second."""
    path = tmp_path / "answers.jsonl"
    base = [f"ckpt={ckpt}", "max_new_tokens=3", f"output={path}"]
    (one,) = infer(make_cfg(*base, f"audio={song}"), out=io.StringIO())
    assert "repeat" not in json.loads(path.read_text())
    two = infer(make_cfg(*base, f"audio=[{song},{song}]"), out=io.StringIO())
    assert two == [one, one]
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r.get("repeat") for r in rows] == [None, 1]


# ------------------------------------------------------------------------------------------------ audio=items.jsonl
def _items(path, *rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_list_of_audio_prompt_items_answers_each_with_its_own_prompt(ckpt, song, tmp_path):  # noqa: F811
    """audio=items.jsonl: one {"audio", "prompt"} object a line (audio relative to the list's folder; prompt optional:
    prompt= or the default). It was taken for an audio file: the model loaded, then 'cannot decode audio'."""
    music = tmp_path / "music"
    music.mkdir()
    (music / "a.wav").write_bytes(open(song, "rb").read())
    items = _items(
        tmp_path / "items.jsonl",
        {"audio": "music/a.wav", "prompt": "What key?", "id": 7},
        "",
        {"audio": song},
        {"audio": "music/a.wav", "prompt": "Tempo?"},
    )
    items.write_bytes(b"\xef\xbb\xbf" + items.read_bytes().replace(b"\n", b"\r\n"))  # as Windows editors save
    path = tmp_path / "answers.jsonl"
    got = infer(
        make_cfg(f"ckpt={ckpt}", f"audio={items}", "max_new_tokens=4", "prompt=Describe", f"output={path}"),
        out=io.StringIO(),
    )
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    a = str(tmp_path / "music" / "a.wav")
    assert [(r["audio"], r["prompt"]) for r in rows] == [(a, "What key?"), (song, "Describe"), (a, "Tempo?")]
    listed = infer(
        make_cfg(
            f"ckpt={ckpt}",
            f"audio=[{a},{song},{a}]",
            "prompt=[What key?,Describe,Tempo?]",
            "max_new_tokens=4",
        ),
        out=io.StringIO(),
    )
    assert got == listed == [r["answer"] for r in rows]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"audio": "nope.wav"}', r"items\.jsonl:2: .*nope\.wav: audio file not found"),
        ('{"audio": "a.wav", "prompt": 3}', r"items\.jsonl:2: prompt=3: expected text"),
        (
            '{"audio": "a.wav", "promt": "x"}',
            r"items\.jsonl:2: unknown field 'promt' \(did you mean prompt\?\)",
        ),
        ('["a.wav"]', r"items\.jsonl:2: got list; expected a JSON object"),
        ('{"audio": "a.wav",', r"items\.jsonl:2: not JSON"),
        ('{"prompt": "x"}', r"items\.jsonl:2: audio=None: expected a path"),
        (
            '{"audio": "a.wav", "question": "x"}',
            r"items\.jsonl:2: unknown field 'question' \(did you mean prompt",
        ),
        ('{"path": "a.wav"}', r"items\.jsonl:2: unknown field 'path' \(did you mean audio"),
        ('{"audio": "a.wav", "system_prompt": "x"}', r"items\.jsonl:2: system_prompt is one setting"),
    ],
)
def test_a_bad_jsonl_item_is_named_by_file_and_line_before_the_model_loads(
    ckpt,  # noqa: F811
    song,  # noqa: F811
    tmp_path,
    monkeypatch,
    line,
    message,
):
    from musicflamingo.cli import user_error_line

    (tmp_path / "a.wav").write_bytes(open(song, "rb").read())
    items = _items(tmp_path / "items.jsonl", {"audio": "a.wav"}, line)
    monkeypatch.setattr(inference, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError) as e:
        infer(make_cfg(f"ckpt={ckpt}", f"audio={items}"), out=io.StringIO())
    assert user_error_line(e.value) is not None
    assert re.search(message, str(e.value)), str(e.value)


def test_prompt_list_beside_items_bringing_prompts_is_refused(ckpt, song, tmp_path):  # noqa: F811
    items = _items(tmp_path / "items.jsonl", {"audio": song, "prompt": "Key?"}, {"audio": song})
    with pytest.raises(inference.InferenceError, match="JSONL list whose items bring their own"):
        infer(make_cfg(f"ckpt={ckpt}", f"audio={items}", "prompt=[a,b]"), out=io.StringIO())
    # without their own prompts, a list of prompts is one per item, as for audio=[...]
    plain = _items(tmp_path / "plain.jsonl", {"audio": song}, {"audio": song})
    got = infer(
        make_cfg(f"ckpt={ckpt}", f"audio={plain}", "prompt=[a,b]", "max_new_tokens=2"), out=io.StringIO()
    )
    assert len(got) == 2


def test_an_unreadable_item_is_named_by_its_jsonl_line(ckpt, song, tmp_path):  # noqa: F811
    """A JSONL item whose audio exists but cannot be decoded is named by file:line as well as by its path, whether
    it stops the run or is skipped (skip_bad_audio=true)."""
    (tmp_path / "notes.wav").write_text("not audio")
    items = _items(tmp_path / "items.jsonl", {"audio": song}, {"audio": "notes.wav", "prompt": "Key?"})
    with pytest.raises(inference.AudioError, match=r"items\.jsonl:2: .*notes\.wav"):
        infer(make_cfg(f"ckpt={ckpt}", f"audio={items}", "max_new_tokens=2"), out=io.StringIO())
    printed = io.StringIO()
    got = infer(
        make_cfg(f"ckpt={ckpt}", f"audio={items}", "max_new_tokens=2", "skip_bad_audio=true"), out=printed
    )
    assert got[0] is not None and got[1] is None
    assert re.search(r"\(skipped: .*items\.jsonl:2: .*notes\.wav", printed.getvalue()), printed.getvalue()


def test_a_jsonl_item_whose_prompt_holds_a_unicode_line_separator_stays_one_item(tmp_path):
    """U+2028 is valid raw inside a JSON string (json.dumps(ensure_ascii=False) writes it so): `str.splitlines` cut
    the item there; the list breaks where manifests and benchmark files break (musicflamingo.jsonl)."""
    from musicflamingo.inference import _read_items

    items = tmp_path / "items.jsonl"
    rows = [{"audio": "a.wav", "prompt": "Verse one\u2028verse two: what key?"}, {"audio": "b.wav"}]
    items.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    got = _read_items(str(items), check=False)
    assert [(a.rsplit("/", 1)[-1], p) for a, p, _, _ in got] == [
        ("a.wav", rows[0]["prompt"]),
        ("b.wav", None),
    ]
