"""Manifest index: build, reuse, staleness (edited lines, other processor settings), require mode, the command;
and the lazy JSONL reader it relies on, which must split and report exactly as read_manifest does."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from tiny_assets import make_tone, write_audio, write_tiny_tokenizer

from musicflamingo.data import dataset as dataset_module
from musicflamingo.data import manifest as manifest_module
from musicflamingo.data.__main__ import main
from musicflamingo.data.dataset import ConversationDataset
from musicflamingo.data.index import ManifestIndexError, build_index, index_path, load_manifest
from musicflamingo.data.manifest import JsonlRecords, ManifestError, read_manifest
from musicflamingo.processor import MusicFlamingoProcessor
from musicflamingo.settings import SettingsError, check_train_settings
from musicflamingo.tokenizer import load_tokenizer

SECONDS = [1.5, 2.5, 3.5, 0.6]


@pytest.fixture(scope="module")
def proc_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("proc")
    write_tiny_tokenizer(d)
    MusicFlamingoProcessor(load_tokenizer(d), chunk_length=1.0, max_audio_len=4.0).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def processor(proc_dir):
    return MusicFlamingoProcessor.from_pretrained(proc_dir)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    for i, s in enumerate(SECONDS):
        write_audio(d / f"c{i}.wav", make_tone(220 * (i + 1), s))
    return d


def _line(i: int, answer: str | None = None) -> str:
    return json.dumps(
        {
            "id": f"r{i}",
            "audio": f"c{i % len(SECONDS)}.wav",
            "conversations": [
                {"role": "user", "content": "<sound>Describe the track."},
                {"role": "assistant", "content": answer or f"Tone number {i}, " + "steady " * i},
            ],
        }
    )


@pytest.fixture
def manifest(tmp_path, clips):
    for f in clips.iterdir():
        shutil.copy(f, tmp_path / f.name)
    path = tmp_path / "train.jsonl"
    path.write_text("".join(_line(i) + "\n" for i in range(6)), encoding="utf-8")
    return path


def _fresh_lengths(path, processor):
    """Lengths computed from scratch: headers read, every record tokenized."""
    return ConversationDataset(read_manifest(path), processor).estimate_lengths()


def _no_estimates(monkeypatch):
    """Make reading audio headers, tokenizing and parsing records fail: what a valid index must spare."""

    def fail(*args, **kwargs):
        raise AssertionError("a record was estimated or parsed although the index holds it")

    monkeypatch.setattr(dataset_module, "estimate_num_tokens", fail)
    monkeypatch.setattr(dataset_module, "audio_duration", fail)
    monkeypatch.setattr(manifest_module, "_to_record", fail)


# ---------------------------------------------------------------------------------------------- the lazy reader
def test_jsonl_records_split_and_parse_as_read_manifest(tmp_path):
    lines = [_line(0), "", "   ", _line(1), "\t", _line(2)]
    for name, text in [
        ("lf.jsonl", "\n".join(lines) + "\n"),
        ("crlf_bom.jsonl", "\ufeff" + "\r\n".join(lines)),  # numpy path: "\r\n" and a BOM
        ("cr.jsonl", "\r".join(lines)),  # other line breaks: the text path
        ("ff.jsonl", "\n".join(lines[:3]) + "\x0c" + "\n".join(lines[3:])),
    ]:
        path = tmp_path / name
        path.write_bytes(text.encode("utf-8"))
        lazy, eager = JsonlRecords(path), read_manifest(path)
        assert len(lazy) == len(eager) == 3, name
        assert [lazy[i] for i in range(3)] == eager, name
        assert lazy[-1] == eager[-1]
        assert [r.source.rsplit(":", 1)[1] for r in eager] == [str(n) for n in lazy.lines]
    assert JsonlRecords(tmp_path / "lf.jsonl").lines.tolist() == [1, 4, 6]
    # U+2028, U+2029 and U+0085 are valid raw inside a JSON string (json.dumps(ensure_ascii=False) writes them):
    # text, not line breaks (they used to cut the record in two: "malformed JSON")
    for ch in ("\u2028", "\u2029", "\x85"):
        path = tmp_path / "raw_separators.jsonl"
        raw = json.dumps(json.loads(_line(0, f"a line{ch}and the next")), ensure_ascii=False)
        assert ch in raw
        path.write_text(raw + "\n" + _line(1) + "\n", encoding="utf-8")
        lazy, eager = JsonlRecords(path), read_manifest(path)
        assert len(eager) == 2 and lazy[0] == eager[0] and f"line{ch}and" in eager[0].messages[-1].content


def test_jsonl_records_report_bad_lines_like_read_manifest(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes((_line(0) + "\n" + '{"id": "x", "conversations": 3}\n').encode())
    records = JsonlRecords(path)
    assert records[0].id == "r0"  # nothing is parsed before access
    with pytest.raises(ManifestError) as lazy:
        records[1]
    with pytest.raises(ManifestError) as eager:
        read_manifest(path)
    assert str(lazy.value) == str(eager.value)
    assert f"{path}:2: field 'conversations' must be a list" in str(lazy.value)
    path.write_bytes(_line(0).encode() + b"\n" + _line(1).encode()[:-2] + b"\xff}\n")
    with pytest.raises(ManifestError, match=rf"{path}:2: not UTF-8 \(byte \d+ of the line\)"):
        JsonlRecords(path)[1]
    path.write_text("\n \n", encoding="utf-8")
    with pytest.raises(ManifestError, match="holds no records"):
        JsonlRecords(path)


# ---------------------------------------------------------------------------------------------- build and use
def test_build_writes_durations_counts_and_hashes_that_training_uses(manifest, processor, monkeypatch):
    report = build_index(manifest, processor)
    assert (report.records, report.reused, report.computed, report.unreadable_audio) == (6, 0, 6, 0)
    table = pq.read_table(index_path(manifest)).to_pydict()
    assert table["line"] == [1, 2, 3, 4, 5, 6]
    assert table["seconds"] == [[s] for s in (SECONDS + SECONDS)[:6]]
    expected = _fresh_lengths(manifest, processor)
    assert table["tokens"] == expected
    assert len(set(table["hash"])) == 6

    _no_estimates(monkeypatch)
    found = load_manifest(manifest, processor, index="require")
    assert isinstance(found.records, JsonlRecords)
    assert (
        ConversationDataset(found.records, processor).estimate_lengths(found.tokens, found.seconds)
        == expected
    )


def test_edited_and_inserted_lines_are_stale_and_only_they_are_estimated(manifest, processor, caplog):
    build_index(manifest, processor)
    lines = manifest.read_text().splitlines()
    lines[2] = _line(2, "A much longer answer than before, " * 3)
    lines.insert(0, _line(9))
    manifest.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING):
        found = load_manifest(manifest, processor)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"{index_path(manifest)} is stale: 2 of 7 records are not in it" in warning
    assert "first: line 1" in warning and "python -m musicflamingo.data index" in warning
    # rows are matched by content: the five untouched records keep theirs although their lines moved
    assert (found.tokens < 0).tolist() == [True, False, False, True, False, False, False]
    ds = ConversationDataset(found.records, processor)
    assert ds.estimate_lengths(found.tokens, found.seconds) == _fresh_lengths(manifest, processor)

    with pytest.raises(ManifestIndexError, match="is stale: 2 of 7 records.*rebuild it"):
        load_manifest(manifest, processor, index="require")
    report = build_index(manifest, processor)  # the rebuild reuses the valid rows
    assert (report.reused, report.computed) == (5, 2)
    assert load_manifest(manifest, processor, index="require").tokens.tolist() == _fresh_lengths(
        manifest, processor
    )


def test_rows_whose_audio_was_unreadable_are_counted_again(manifest, processor, caplog):
    """A row built while its audio could not be read (a download not finished) counts no audio; once the file is
    there, training and a rebuild count it again (both reused the short count for ever), and `require` does not
    call the index stale for it."""
    audio = manifest.parent / "c1.wav"
    kept = audio.read_bytes()
    audio.unlink()
    assert build_index(manifest, processor).unreadable_audio == 2  # lines 1 and 5 name c1.wav
    audio.write_bytes(kept)
    with caplog.at_level(logging.WARNING):
        found = load_manifest(manifest, processor, index="require")
    assert "2 records had audio that could not be read" in caplog.text and "first: line 2" in caplog.text
    assert (found.tokens < 0).tolist() == [False, True, False, False, False, True]
    ds = ConversationDataset(found.records, processor)
    assert ds.estimate_lengths(found.tokens, found.seconds) == _fresh_lengths(manifest, processor)
    report = build_index(manifest, processor)
    assert (report.reused, report.computed, report.unreadable_audio) == (4, 2, 0)
    assert load_manifest(manifest, processor).tokens.tolist() == _fresh_lengths(manifest, processor)


def test_other_processor_settings_make_counts_stale_but_keep_durations(
    manifest, processor, proc_dir, monkeypatch, caplog
):
    build_index(manifest, processor)
    other = MusicFlamingoProcessor(load_tokenizer(proc_dir), chunk_length=2.0, max_audio_len=8.0)
    with caplog.at_level(logging.WARNING):
        found = load_manifest(manifest, other)
    assert "built for other settings (chunk_length 1.0 -> 2.0, max_audio_len 4.0 -> 8.0)" in caplog.text
    assert (found.tokens < 0).all()
    assert found.seconds == {i: [s] for i, s in enumerate((SECONDS + SECONDS)[:6])}
    expected = _fresh_lengths(manifest, other)
    monkeypatch.setattr(dataset_module, "audio_duration", None)  # durations come from the index
    assert ConversationDataset(found.records, other).estimate_lengths(found.tokens, found.seconds) == expected

    prompt = MusicFlamingoProcessor(load_tokenizer(proc_dir), 1.0, 4.0, default_system_prompt="Be brief.")
    with pytest.raises(ManifestIndexError, match=r"other settings \(system_prompt changed, probe changed\)"):
        load_manifest(manifest, prompt, index="require")
    with pytest.raises(ManifestIndexError, match=r"other settings \(audio_root None -> "):
        load_manifest(manifest, processor, audio_root=manifest.parent, index="require")


def test_require_off_and_a_broken_index(manifest, processor, caplog):
    with pytest.raises(ManifestIndexError, match=rf"{manifest}: no index .*data.index=require"):
        load_manifest(manifest, processor, index="require")
    index_path(manifest).write_bytes(b"not parquet")
    with pytest.raises(ManifestIndexError, match="unreadable manifest index"):
        load_manifest(manifest, processor, index="require")
    with caplog.at_level(logging.WARNING):
        assert load_manifest(manifest, processor).tokens is None
    assert "unreadable manifest index" in caplog.text
    assert load_manifest(manifest, processor, index="off").tokens is None
    with pytest.raises(ValueError, match="index must be one of auto, off, require, got 'always'"):
        load_manifest(manifest, processor, index="always")


def test_build_names_the_bad_line_and_writes_nothing(manifest, processor):
    manifest.write_text(_line(0) + "\n" + '{"id": "x", "audio": "c0.wav", "conversations": []}\n')
    with pytest.raises(ManifestError, match=rf"{manifest}:2: field 'conversations' is empty"):
        build_index(manifest, processor)
    assert not index_path(manifest).exists()


def test_json_list_manifest_is_indexed_by_record_content(manifest, processor, caplog):
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    path = manifest.with_name("list.json")
    path.write_text(json.dumps(records, indent=1))
    build_index(path, processor)
    assert load_manifest(path, processor, index="require").tokens.tolist() == _fresh_lengths(path, processor)
    records[4]["conversations"][1]["content"] = "Changed."
    path.write_text(json.dumps(records))  # reformatting alone changes nothing; the edited record is stale
    with caplog.at_level(logging.WARNING):
        found = load_manifest(path, processor)
    assert "1 of 6 records are not in it" in caplog.text
    assert np.flatnonzero(found.tokens < 0).tolist() == [4]


# ---------------------------------------------------------------------------------------------- entry points
def test_command_builds_every_manifest_in_worker_processes(manifest, proc_dir, processor, capsys):
    second = manifest.with_name("val.jsonl")
    second.write_text(_line(3) + "\n" + _line(4) + "\n")
    main(["index", str(manifest), str(second), "--processor", str(proc_dir), "--workers", "2"])
    out = capsys.readouterr().out.splitlines()
    assert [line.rsplit(" in ", 1)[0] for line in out] == [
        f"{index_path(manifest)}: 6 records (0 reused, 6 computed, 0 with unreadable audio)",
        f"{index_path(second)}: 2 records (0 reused, 2 computed, 0 with unreadable audio)",
    ]
    assert pq.read_table(index_path(manifest)).column("tokens").to_pylist() == _fresh_lengths(
        manifest, processor
    )
    (manifest.parent / "c1.wav").unlink()  # --force re-reads the audio: now one header is missing
    main(["index", str(manifest), "--processor", str(proc_dir), "--workers", "0", "--force"])
    assert "(0 reused, 6 computed, 2 with unreadable audio)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["index", str(manifest)])  # --processor is required


def test_datamodule_takes_lengths_from_the_index(manifest, processor, monkeypatch):
    from musicflamingo.data.datamodule import MusicFlamingoDataModule

    expected = _fresh_lengths(manifest, processor)
    build_index(manifest, processor)
    _no_estimates(monkeypatch)
    dm = MusicFlamingoDataModule(
        train=str(manifest), processor=processor, batch_max_tokens=4096, index="require"
    )
    dm.setup("fit")
    assert dm.train_dataset.lengths.tolist() == expected
    monkeypatch.undo()
    assert len(next(iter(dm.train_dataloader()))["ids"]) > 0  # records parse when their batch comes
    with pytest.raises(ValueError, match="index must be one of auto, off, require, got 'yes'"):
        MusicFlamingoDataModule(train=str(manifest), processor=processor, index="yes")
    with pytest.raises(SettingsError, match="data.index"):
        check_train_settings({"data": {"index": "yes"}})


def test_an_audio_root_that_is_no_folder_is_refused(manifest, proc_dir, processor, capsys):
    """`--audio-root` with a typo used to index every record as having unreadable audio, exit status 0."""
    with pytest.raises(ManifestIndexError, match="nowhere: not a folder"):
        build_index(manifest, processor, manifest.parent / "nowhere")
    with pytest.raises(SystemExit) as e:
        main(["index", str(manifest), "--processor", str(proc_dir), "--audio-root", str(manifest)])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"error: audio_root {manifest}: not a folder (relative audio paths resolve against it)"
    )
    assert not index_path(manifest).exists()
    assert build_index(manifest, processor, manifest.parent).unreadable_audio == 0


def test_an_index_that_cannot_be_written_is_named(manifest, processor, monkeypatch):
    """pyarrow's write errors (a full disk, a read-only folder) carry no file name, so the command showed a traceback:
    now the index file is named with the reason, and no partial file is left."""

    def full_disk(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(pq, "write_table", full_disk)
    with pytest.raises(ManifestIndexError, match=r"\.index\.parquet: cannot write the index \(No space left"):
        build_index(manifest, processor)
    assert not index_path(manifest).exists()
    assert not list(manifest.parent.glob(".*.tmp"))
