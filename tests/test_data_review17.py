"""Review round 17, large packed manifests of mixed formats: packed rows stay one row when built lengths exceed
their estimates, and audio no header states the length of (raw AAC, an MP3 without a Xing frame) is decoded once,
when the index or the shards are written, not counted as no audio or decoded again at every launch."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from test_data_shards import _even_manifest, _line, litdata_cache, processor  # noqa: F401 (fixtures)
from tiny_assets import make_tone, write_audio

from musicflamingo.data.dataset import ConversationDataset
from musicflamingo.data.manifest import read_manifest

collate_module = sys.modules["musicflamingo.data.collate"]  # the package's `collate` is the function


def _ffmpeg(src, dst, *codec):  # noqa: ANN001, ANN202
    if shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None:
        pytest.skip("needs Debian's ffmpeg and ffprobe (make setup)")
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(src), *codec, str(dst)], check=True)
    return dst


@pytest.fixture(scope="module")
def no_length_clips(tmp_path_factory, processor):  # noqa: ANN001, ANN201, F811
    """Raw ADTS AAC and Xing-less MP3 clips (no length in any header) beside a WAV, at 44.1 kHz (encoded once), and
    the built samples' lengths."""
    manifest = _no_length_manifest(tmp_path_factory.mktemp("clips"))
    ds = ConversationDataset(read_manifest(manifest), processor)
    return manifest, [len(ds[i]["input_ids"]) for i in range(len(ds))]


def _no_length_manifest(d):  # noqa: ANN001, ANN202
    d.mkdir(parents=True, exist_ok=True)
    names = []
    for k, secs in enumerate((1.37, 2.21)):
        src = write_audio(d / f"s{k}.wav", make_tone(440.0, secs, sr=44100), sr=44100)
        names += [
            _ffmpeg(src, d / f"s{k}.aac", "-c:a", "aac", "-f", "adts").name,
            _ffmpeg(src, d / f"s{k}.mp3", "-c:a", "libmp3lame", "-q:a", "4", "-write_xing", "0").name,
            src.name,
        ]
    (d / "m.jsonl").write_text(
        "".join(_line(f"r{i}", a) + "\n" for i, a in enumerate(names)), encoding="utf-8"
    )
    return d / "m.jsonl"


def test_a_packed_batch_built_longer_than_its_estimates_stays_one_row_and_is_warned_about(
    processor,  # noqa: F811
    tmp_path,
    monkeypatch,
    caplog,
):
    """With data.pack=true every batch is one row the sampler planned from estimated lengths; a clip whose built
    length exceeds its estimate (an m4a's container length is a token short) made collate_packed split the row in
    two rows padded to the longest, twice the tokens the budget was set for, without a word. Now the row stays one
    (a token or two over) and the first such row is warned about, naming the overflow."""
    from musicflamingo.data.datamodule import MusicFlamingoDataModule

    manifest = _even_manifest(tmp_path / "d", 4)
    built = len(ConversationDataset(read_manifest(manifest), processor)[0]["input_ids"])
    # every estimate one token short, as an m4a's may be
    monkeypatch.setattr(
        ConversationDataset, "estimate_lengths", lambda self, *a, **k: [built - 1] * len(self)
    )
    monkeypatch.setattr(collate_module, "_over_budget_rows", 0, raising=False)
    dm = MusicFlamingoDataModule(
        train=str(manifest), processor=processor, pack=True, batch_max_tokens=2 * (built - 1)
    )
    dm.setup("fit")
    with caplog.at_level(logging.WARNING, logger="musicflamingo.data.collate"):
        batches = list(dm.train_dataloader())
    assert [len(b["ids"]) for b in batches] == [2, 2]  # planned: two conversations a row
    for b in batches:
        assert b["input_ids"].shape == (1, 2 * built)  # one row, 2 tokens over; split it was (2, built)
        assert b["seq_ids"][0].tolist() == [0] * built + [1] * built
    warned = [r.getMessage() for r in caplog.records if "packed row" in r.getMessage()]
    assert len(warned) == 1  # once per process
    assert f"holds {2 * built} tokens, 2 more than its token budget of {2 * (built - 1)}" in warned[0]


def test_collate_packed_without_one_row_still_packs_several_rows(processor, tmp_path):  # noqa: F811
    """collate_packed's own packing (several rows from a list of samples) is unchanged."""
    from musicflamingo.data.collate import collate_packed

    ds = ConversationDataset(read_manifest(_even_manifest(tmp_path / "d", 3)), processor)
    samples = [ds[i] for i in range(3)]
    n = len(samples[0]["input_ids"])
    packed = collate_packed(samples, processor.pad_token_id, max_tokens=2 * n)
    assert packed["input_ids"].shape == (2, 2 * n)
    assert collate_packed(samples, processor.pad_token_id, max_tokens=n, one_row=True)["input_ids"].shape == (
        1,
        3 * n,
    )


def test_an_index_records_the_decoded_length_of_audio_no_header_states(
    processor,  # noqa: F811
    no_length_clips,
    tmp_path,
    caplog,
):
    """Raw AAC and Xing-less MP3 rows were stored with NaN durations, read as "audio that could not be read": every
    launch warned about them and decoded each such clip again. The build decodes them once and stores their decoded
    length, whose count is the built sample's."""
    from musicflamingo.data.index import build_index, load_manifest

    manifest = shutil.copytree(no_length_clips[0].parent, tmp_path / "d") / "m.jsonl"
    built = no_length_clips[1]
    report = build_index(manifest, processor)
    assert report.unreadable_audio == 0
    with caplog.at_level(logging.INFO, logger="musicflamingo.data.index"):
        found = load_manifest(manifest, processor, index="require")
    assert found.tokens.tolist() == built
    assert not [r for r in caplog.records if "could not be read" in r.getMessage()]
    # the durations alone (a count made stale by another system prompt) give the same counts
    processor2 = type(processor)(
        processor.tokenizer, chunk_length=1.0, max_audio_len=4.0, default_system_prompt="Be brief."
    )
    ds2 = ConversationDataset(read_manifest(manifest), processor2)
    stale = load_manifest(manifest, processor2)
    assert (stale.tokens < 0).all() and len(stale.seconds) == len(ds2)
    longer = (
        len(ds2[2]["input_ids"]) - built[2]
    )  # the system turn's tokens, the same in every record (a WAV's)
    assert ds2.estimate_lengths(stale.tokens, stale.seconds) == [n + longer for n in built]


@pytest.fixture(scope="module")
def no_length_shards(no_length_clips, tmp_path_factory):  # noqa: ANN001, ANN201
    """The shards of ``no_length_clips``, written once."""
    from musicflamingo.data.shards import write_shards

    out = tmp_path_factory.mktemp("shards") / "set"
    write_shards(no_length_clips[0], str(out))
    return out


def test_shards_estimate_audio_no_header_states_by_its_decoded_length(
    processor,  # noqa: F811
    no_length_clips,
    no_length_shards,
    litdata_cache,  # noqa: F811
):
    """A shard set's records held no length for a raw AAC or Xing-less MP3 clip, and shards estimate without
    fetching audio: such a record counted as no audio at all (a record far over the batch budget passed setup,
    packed rows overflowed it). The writer decodes such a clip once and stores its length."""
    from musicflamingo.data.shards import ShardDataset

    built = no_length_clips[1]
    shards = ShardDataset(no_length_shards, processor)
    assert shards.estimate_lengths() == built
    assert [len(shards[i]["input_ids"]) for i in (0, 1)] == built[:2]  # an AAC's and an MP3's sample
    assert json.loads(shards.records.text(0))["seconds"][0] > 1.3


def test_an_object_stores_records_are_held_in_a_local_copy_not_in_memory(
    processor,  # noqa: F811
    no_length_shards,
    tmp_path,
    litdata_cache,  # noqa: F811
):
    """A shard set read through litdata (an object store; `local:` takes that path) held every record's text in
    memory on every rank (twice while reading: a list of texts, then one buffer): 3.7 GiB per rank for 10 million
    records. They are now copied, as they are read, to a file of the process's own in the cache folder, and held
    as their offsets there (as a local folder's are), the same records and digests; the file goes at exit."""
    from test_data_review16 import _held_bytes

    from musicflamingo.data import shards as shards_module
    from musicflamingo.data.shards import ShardDataset, ShardError

    cache = tmp_path / "cache"
    local = ShardDataset(no_length_shards, processor)
    remote = ShardDataset(f"local:{no_length_shards}", processor, cache_dir=str(cache))
    records = remote.records
    assert not any(isinstance(v, (bytes, bytearray)) for v in vars(records).values())
    assert _held_bytes(records)[1] < 200  # the copy's path; the text is ~500 bytes a record
    assert np.array_equal(records.digests, local.records.digests)
    assert [records.parse(i) for i in range(len(records))] == [
        local.records.parse(i) for i in range(len(records))
    ]
    assert remote.estimate_lengths() == local.estimate_lengths()
    assert len(remote[4]["input_ids"]) == len(local[4]["input_ids"])
    (copy,) = cache.glob(".musicflamingo-records-*.bin")
    shards_module._remove_spool(str(copy), os.getpid() + 1)  # another process's exit leaves it
    assert copy.exists()
    shards_module._remove_spool(str(copy), os.getpid())  # as at exit
    assert not copy.exists()
    with pytest.raises(ShardError, match="cannot read record 0"):
        records[0]
