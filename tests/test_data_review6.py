"""Review round 6, data journey: a researcher's own manifests through index, shards, mixtures, ranks and resume."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
from tiny_assets import make_tone, write_audio, write_tiny_tokenizer

from musicflamingo.data.datamodule import MusicFlamingoDataModule
from musicflamingo.data.sampler import TokenBudgetBatchSampler
from musicflamingo.processor import MusicFlamingoProcessor
from musicflamingo.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    d = tmp_path_factory.mktemp("proc")
    write_tiny_tokenizer(d)
    MusicFlamingoProcessor(load_tokenizer(d), chunk_length=1.0, max_audio_len=4.0).save_pretrained(d)
    return MusicFlamingoProcessor.from_pretrained(d)


def _line(i: int, audio: str | None = None) -> str:
    return json.dumps(
        {
            "id": f"r{i}",
            "audio": audio or f"c{i % 3}.wav",
            "conversations": [
                {"role": "user", "content": "<sound>Describe the track."},
                {"role": "assistant", "content": f"Tone {i}, " + "steady " * (i % 9)},
            ],
        }
    )


@pytest.fixture
def manifest(tmp_path):
    for i, s in enumerate([0.6, 1.5, 2.5]):
        write_audio(tmp_path / f"c{i}.wav", make_tone(220 * (i + 1), s))
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(_line(i) for i in range(24)) + "\n")
    return path


def _trainer(world: int = 1, rank: int = 0) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        world_size=world,
        global_rank=rank,
        _accelerator_connector=types.SimpleNamespace(use_distributed_sampler=False),
        training=True,
        current_epoch=0,
        num_training_batches=10**9,
    )


# ------------------------------------------------------------------------------------- resume after data edits
def test_sampler_refuses_to_resume_mid_epoch_over_reordered_samples():
    lengths = np.random.default_rng(0).integers(10, 200, size=60)
    a = TokenBudgetBatchSampler(lengths, 600, seed=1)
    trained = list(a)[:3]
    state = a.state_dict(batches_consumed=3)

    same = TokenBudgetBatchSampler(lengths, 600, seed=1)
    same.load_state_dict(state)
    rest = list(same)
    assert rest == list(a)[3:]
    assert sorted(i for b in trained + rest for i in b) == list(range(60))

    # the same records in another order (a manifest shuffled between runs): count and batch count unchanged
    moved = TokenBudgetBatchSampler(lengths[::-1].copy(), 600, seed=1)
    assert moved.num_batches == a.num_batches
    with pytest.raises(ValueError, match="epoch 0's batches differ"):
        moved.load_state_dict(state)


def test_datamodule_refuses_to_resume_after_the_manifest_was_reordered(processor, manifest):
    def module():
        dm = MusicFlamingoDataModule(str(manifest), processor=processor, batch_max_tokens=1200, index="off")
        dm.trainer = _trainer()
        dm.setup("fit")
        return dm

    dm = module()
    for batch in list(dm.train_dataloader())[:2]:
        dm.on_before_batch_transfer(batch, 0)
    state = dm.state_dict()
    assert state["sampler"]["batches_consumed"] == 2

    module().load_state_dict(state)  # unchanged data resumes
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join(lines[12:] + lines[:12]) + "\n")
    with pytest.raises(ValueError, match="training data changed"):
        module().load_state_dict(state)


# ------------------------------------------------------------------------------------- damaged shards
@pytest.fixture
def shards(tmp_path, manifest, monkeypatch):
    pytest.importorskip("litdata")
    monkeypatch.setenv("LITDATA_CACHE_DIR", str(tmp_path / "litdata_cache"))
    monkeypatch.setattr(
        "litdata.utilities.dataset_utilities._LITDATA_CACHE_DIR",
        str(tmp_path / "litdata_cache"),
        raising=False,
    )
    from musicflamingo.data.shards import write_shards

    out = tmp_path / "shards"
    write_shards(manifest, str(out), chunk_bytes="100KB", workers=1)
    return out


def test_missing_or_truncated_shard_chunks_are_named(processor, shards):
    import shutil

    from musicflamingo.data.shards import ShardDataset, ShardError

    chunks = sorted(shards.glob("chunk-*.bin"))
    assert len(chunks) > 1
    whole = shards.parent / "whole"
    shutil.copytree(shards, whole)
    # an interrupted copy: the second audio chunk cut short (litdata waited for it as for a download, then timed out)
    data = chunks[1].read_bytes()
    chunks[1].write_bytes(data[: len(data) // 3])
    with pytest.raises(
        ShardError, match=rf"{chunks[1].name}: {len(data) // 3} bytes, {len(data)} when written"
    ):
        ds = ShardDataset(shards, processor)
        [ds[i] for i in range(len(ds))]
    # a records chunk gone
    (whole / "records" / "chunk-0-0.bin").unlink()
    with pytest.raises(ShardError, match=r"records/chunk-0-0\.bin: missing \(listed in .*index\.json\)"):
        ShardDataset(whole, processor)


def test_damaged_shard_contents_are_named(processor, shards):
    import struct

    from musicflamingo.data.shards import ShardDataset, ShardError

    # an audio sample whose header was overwritten: its file count no longer fits its bytes
    for chunk in sorted(shards.glob("chunk-*.bin")):
        data = bytearray(chunk.read_bytes())
        at = data.find(struct.pack("<QI", 5, 1))
        if at >= 0:
            data[at + 8 : at + 12] = b"\xff" * 4
            chunk.write_bytes(bytes(data))
            break
    else:
        pytest.fail("sample 5's header not found")
    ds = ShardDataset(shards, processor)
    with pytest.raises(ShardError, match=r"audio sample 5 \(.*train\.jsonl:6\) is damaged"):
        ds[5]
    assert isinstance(ds[4], dict)
    # a records chunk with bytes that are no UTF-8 text
    chunk = shards / "records" / "chunk-0-0.bin"
    data = bytearray(chunk.read_bytes())
    at = data.find(b'"messages"')
    assert at >= 0
    data[at : at + 4] = b"\xff" * 4
    chunk.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"records: entry 0 is not a record's text"):
        ShardDataset(shards, processor)


# ------------------------------------------------------------------------------------- mixture weights
def test_a_weight_that_draws_no_sample_is_refused_naming_the_manifest(processor, manifest, tmp_path):
    small = tmp_path / "small.jsonl"
    small.write_text(_line(0) + "\n" + _line(1) + "\n")
    spec = [{"path": str(manifest), "weight": 1.0}, {"path": str(small), "weight": 0.2}]
    dm = MusicFlamingoDataModule(spec, processor=processor, batch_max_tokens=1200, index="off")
    # 0.2 x 2 records rounds to 0 per epoch: the manifest was silently never trained on
    with pytest.raises(
        ValueError, match=r"data\.train\[1\] \(.*small\.jsonl\): weight 0\.2 x 2 samples draws"
    ):
        dm.setup("fit")
    spec[1]["weight"] = 0.3  # round(0.6) = 1: one of its two records per epoch
    dm = MusicFlamingoDataModule(spec, processor=processor, batch_max_tokens=1200, index="off")
    dm.setup("fit")
    drawn = dm.train_dataset.epoch_indices(0)
    assert (drawn >= 24).sum() == 1


def test_a_folder_given_as_manifest_names_the_command_with_its_path(tmp_path):
    from musicflamingo.data.manifest import ManifestError, read_manifest

    with pytest.raises(ManifestError) as e:
        read_manifest(tmp_path)
    assert f"shard MANIFEST {tmp_path}`" in str(e.value)


# ------------------------------------------------------------------------------------- index
def test_reordering_a_json_list_manifest_keeps_its_index_valid(processor, manifest, caplog):
    from musicflamingo.data.index import build_index, load_manifest

    records = [json.loads(line) for line in manifest.read_text().splitlines()[:6]]
    for r in records:
        del r["id"]  # ids default to the record's line
    listed = manifest.with_name("list.json")
    listed.write_text(json.dumps(records, indent=1))
    build_index(listed, processor)
    before = load_manifest(listed, processor).tokens
    listed.write_text(json.dumps(records[::-1], indent=1))
    with caplog.at_level("WARNING", logger="musicflamingo.data.index"):
        after = load_manifest(listed, processor)
    assert "stale" not in caplog.text
    assert after.tokens.tolist() == before[::-1].tolist()
    assert (after.tokens > 0).all()
