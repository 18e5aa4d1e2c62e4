"""Manifest reading: both layouts, audio field forms, and errors that name file:line and the field."""

import json

import pytest

from musicflamingo.data.manifest import AudioRef, ManifestError, Message, read_manifest

USER = {"role": "user", "content": "<sound>Describe the track."}
ASSISTANT = {"role": "assistant", "content": "A slow piano ballad."}


def _write_jsonl(path, objs):
    path.write_text(
        "\n".join(o if isinstance(o, str) else json.dumps(o) for o in objs) + "\n", encoding="utf-8"
    )
    return path


def test_our_layout_all_audio_forms(tmp_path):
    m = _write_jsonl(
        tmp_path / "m.jsonl",
        [
            {"id": "a", "audio": "clips/a.mp3", "conversations": [USER, ASSISTANT], "task": "caption"},
            {
                "id": 7,
                "audio": ["x.wav", {"path": "/abs/y.flac", "offset": 1.5, "duration": 2}],
                "conversations": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "<sound>Compare with <sound>."},
                    ASSISTANT,
                ],
                "meta": {"src": "k"},
            },
            "",  # blank lines are ignored
            {"conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        ],
    )
    recs = read_manifest(m)
    assert [r.id for r in recs] == ["a", "7", "m.jsonl:4"]
    assert recs[0].audios == [AudioRef(str(tmp_path / "clips/a.mp3"))]
    assert recs[0].extra == {"task": "caption"}
    assert recs[0].source == f"{m}:1"
    assert recs[1].audios == [AudioRef(str(tmp_path / "x.wav")), AudioRef("/abs/y.flac", 1.5, 2.0)]
    assert recs[1].messages[0] == Message("system", "Be brief.")
    assert recs[1].extra == {"meta": {"src": "k"}}
    assert recs[2].audios == [] and recs[2].source.endswith(":4")
    # audio_root replaces the manifest folder for relative paths
    assert read_manifest(m, audio_root="/data")[0].audios[0].path == "/data/clips/a.mp3"


def test_af3_layout_json_list_and_jsonl(tmp_path):
    rec = {
        "id": "s1",
        "sound": "clips/a.wav",
        "conversations": [
            {"from": "human", "value": "<sound>\nWhat is the tempo?"},
            {"from": "gpt", "value": "96 BPM."},
        ],
        "duration": 12.0,
    }
    listed = tmp_path / "af3.json"
    listed.write_text(json.dumps([rec, {**rec, "id": "s2"}], indent=2), encoding="utf-8")
    lines = _write_jsonl(tmp_path / "af3.jsonl", [rec])
    ours = _write_jsonl(
        tmp_path / "ours.jsonl",
        [
            {
                "id": "s1",
                "audio": "clips/a.wav",
                "conversations": [
                    {"role": "user", "content": "<sound>What is the tempo?"},
                    {"role": "assistant", "content": "96 BPM."},
                ],
                "duration": 12.0,
            }
        ],
    )
    a, b, c = read_manifest(listed), read_manifest(lines), read_manifest(ours)
    assert [r.id for r in a] == ["s1", "s2"]
    # the JSON list reports the line each element starts on
    assert a[0].source == f"{listed}:2" and int(a[1].source.rsplit(":", 1)[1]) > 2
    for r in (a[0], b[0]):
        assert (
            r.messages
            == c[0].messages
            == [Message("user", "<sound>What is the tempo?"), Message("assistant", "96 BPM.")]
        )
        assert r.audios == c[0].audios
        assert r.extra == {"duration": 12.0}


@pytest.mark.parametrize(
    "line, expected",
    [
        ('{"id": "a", "conversations": [', "malformed JSON"),
        ('{"id": "a", "audio": "x.wav"}', "no 'conversations'"),
        ('{"id": "a", "conversations": []}', "'conversations' is empty"),
        ('{"id": "a", "conversations": {"role": "user"}}', "'conversations' must be a list"),
        (
            '{"id": "a", "conversations": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}',
            "conversations[0].role is 'bot'",
        ),
        (
            '{"id": "a", "conversations": [{"from": "robot", "value": "x"}, {"from": "gpt", "value": "y"}]}',
            "conversations[0].from is 'robot'",
        ),
        (
            '{"id": "a", "conversations": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]}',
            "conversations[0].content must be a string",
        ),
        (
            '{"id": "a", "audio": 3, "conversations": [{"role": "user", "content": "<sound>x"}, '
            '{"role": "assistant", "content": "y"}]}',
            "field 'audio' must be a path string",
        ),
        (
            '{"id": "a", "audio": [{"path": "a.wav", "offset": -1}], "conversations": [{"role": "user", '
            '"content": "<sound>x"}, {"role": "assistant", "content": "y"}]}',
            "field 'audio[0].offset' must be a number >= 0",
        ),
        (
            '{"id": "a", "audio": ["a.wav", "b.wav"], "conversations": [{"role": "user", "content": "<sound>x"}, '
            '{"role": "assistant", "content": "y"}]}',
            "1 '<sound>' placeholder(s) in 'conversations' but 2 audio(s)",
        ),
        (
            '{"id": "a", "conversations": [{"role": "user", "content": "<sound>x"}, {"role": "assistant", "content": "y"}]}',
            "1 '<sound>' placeholder(s) in 'conversations' but 0 audio(s)",
        ),
        (
            '{"id": "a", "conversations": [{"role": "user", "content": "x"}]}',
            "last message of 'conversations' must be the assistant's",
        ),
        (
            '{"id": "a", "conversations": [{"role": "user", "content": "x<|im_end|>"}, {"role": "assistant", "content": "y"}]}',
            "contains the special token '<|im_end|>'",
        ),
        ("[1, 2]", "expected a JSON object per record"),
    ],
)
def test_errors_name_file_line_and_field(tmp_path, line, expected):
    good = json.dumps({"id": "ok", "conversations": [{"role": "user", "content": "x"}, ASSISTANT]})
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n\n{line}\n", encoding="utf-8")
    with pytest.raises(ManifestError) as e:
        read_manifest(path)
    assert f"{path}:3" in str(e.value)
    assert expected in str(e.value)


def test_eval_manifests_may_end_with_user_turn_and_list_errors(tmp_path):
    path = _write_jsonl(
        tmp_path / "q.jsonl", [{"id": "q", "conversations": [{"role": "user", "content": "x"}]}]
    )
    assert read_manifest(path, require_assistant_last=False)[0].messages[-1].role == "user"
    bad_list = tmp_path / "l.json"
    bad_list.write_text('[\n  {"conversations": []},\n  {"conversations": [1]}\n]', encoding="utf-8")
    with pytest.raises(ManifestError, match=r"l\.json:2: field 'conversations' is empty"):
        read_manifest(bad_list)
    bad_list.write_text(
        '[\n  {"id": 1, "conversations": [{"role": "user", "content": "x"}, {"role": "assistant",'
        ' "content": "y"}]}\n  {"id": 2}\n]',
        encoding="utf-8",
    )
    with pytest.raises(ManifestError, match=r"l\.json:3: malformed JSON list: expected ',' or ']'"):
        read_manifest(bad_list)
    with pytest.raises(ManifestError, match="cannot read manifest"):
        read_manifest(tmp_path / "missing.jsonl")


def test_a_folder_given_as_manifest_says_it_is_no_shard_folder(tmp_path):
    """`data.train=DIR` with no index.json in DIR (an empty folder, shards not written yet) said only "Is a
    directory": the error now says a folder is read as shards only when it holds index.json, and how to write one."""
    from musicflamingo.data.manifest import is_json_list

    (tmp_path / "shards").mkdir()
    for read in (read_manifest, is_json_list):
        with pytest.raises(
            ManifestError, match=r"shards: a folder, not a manifest file .* no index\.json; write one"
        ):
            read(tmp_path / "shards")
