"""Review round 16, data: training samples cut audio tails with the processor's own hop length.

`ConversationDataset` cut a clip's trailing zero-token tail with the 160-sample hop whatever the processor's
feature extractor used; with a folder's `hop_length=320` a 321-640-sample tail past a window stayed, a window of 0
audio tokens that the reference never builds (and the estimate disagreed with the built sample).
"""

from __future__ import annotations

import json

from tiny_assets import make_tone, write_audio, write_tiny_tokenizer

from musicflamingo.data.dataset import ConversationDataset
from musicflamingo.data.manifest import read_manifest
from musicflamingo.processor import MusicFlamingoProcessor
from musicflamingo.tokenizer import load_tokenizer


def test_a_tail_of_no_tokens_is_cut_with_the_processors_hop_length(tmp_path):
    tok = load_tokenizer(write_tiny_tokenizer(tmp_path / "tok"))
    p = MusicFlamingoProcessor(tok, chunk_length=1.0, max_audio_len=4.0, n_fft=512, hop_length=320)
    n = 16000 + 500  # 1 s + 500 samples: the tail is 1 frame at hop 320, no audio token
    assert p.usable_samples(n) == 16000
    write_audio(tmp_path / "t.wav", make_tone(440, n / 16000))
    conv = [{"role": "user", "content": "<sound>Q"}, {"role": "assistant", "content": "A"}]
    line = json.dumps({"id": "t", "sound": "t.wav", "conversations": conv})
    (tmp_path / "t.jsonl").write_text(line + "\n", encoding="utf-8")
    ds = ConversationDataset(read_manifest(tmp_path / "t.jsonl"), p)
    s = ds[0]
    assert s["input_features"].shape[0] == 1  # one window, the tail dropped
    assert s["num_audio_tokens"] == p.audio_token_count(16000)
    assert ds.estimate_lengths() == [len(s["input_ids"])]


def test_shards_estimate_an_m4a_style_clip_as_its_manifest_does(tmp_path, monkeypatch):
    """A clip only ffmpeg reads (mka here) was stored in the shards' records with no length: the shard set estimated
    it as no audio (a record far over the batch budget passed setup) where the manifest path counted it."""
    import shutil
    import subprocess

    import pytest

    from musicflamingo.data.__main__ import main
    from musicflamingo.data.shards import ShardDataset

    if shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None:
        pytest.skip("needs Debian's ffmpeg and ffprobe (make setup)")
    monkeypatch.setenv("LITDATA_CACHE_DIR", str(tmp_path / "litdata_cache"))
    monkeypatch.setattr(
        "litdata.utilities.dataset_utilities._LITDATA_CACHE_DIR",
        str(tmp_path / "litdata_cache"),
        raising=False,
    )
    tok = load_tokenizer(write_tiny_tokenizer(tmp_path / "tok"))
    p = MusicFlamingoProcessor(tok, chunk_length=1.0, max_audio_len=4.0)
    data = tmp_path / "data"
    data.mkdir()
    write_audio(data / "src.wav", make_tone(440, 2.5))
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(data / "src.wav"), "-c:a", "pcm_s16le"]
    subprocess.run([*cmd, str(data / "a.mka")], check=True)
    conv = [{"role": "user", "content": "<sound>Q"}, {"role": "assistant", "content": "A"}]
    lines = [
        json.dumps({"id": f"r{i}", "sound": a, "conversations": conv})
        for i, a in enumerate(["a.mka", "src.wav"])
    ]
    (data / "m.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    files = ConversationDataset(read_manifest(data / "m.jsonl"), p)
    built = [len(files[i]["input_ids"]) for i in range(len(files))]
    assert files.estimate_lengths() == built
    main(["shard", str(data / "m.jsonl"), str(tmp_path / "shards"), "--workers", "1"])
    shards = ShardDataset(tmp_path / "shards", p)
    assert shards.estimate_lengths() == built


def test_an_index_is_stale_for_another_hop_length_and_old_ones_stay_valid(tmp_path, monkeypatch, caplog):
    """The index's cached token counts depend on the mel front end: a processor folder with `hop_length=320` reused
    counts made at 160 (twice the frames per second). Indexes built before the front end was recorded (all at
    Whisper's 400/160) stay valid for such a processor."""
    import logging

    import pytest

    from musicflamingo.data import index as index_module
    from musicflamingo.data.index import ManifestIndexError, build_index, load_manifest

    tok = load_tokenizer(write_tiny_tokenizer(tmp_path / "tok"))
    p = MusicFlamingoProcessor(tok, chunk_length=1.0, max_audio_len=4.0)
    p320 = MusicFlamingoProcessor(tok, chunk_length=1.0, max_audio_len=4.0, n_fft=512, hop_length=320)
    write_audio(tmp_path / "t.wav", make_tone(440, 1.5))
    conv = [{"role": "user", "content": "<sound>Q"}, {"role": "assistant", "content": "A"}]
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"id": "t", "sound": "t.wav", "conversations": conv}) + "\n", encoding="utf-8")
    build_index(m, p)
    assert load_manifest(m, p, index="require").tokens.tolist() == [
        len(ConversationDataset(read_manifest(m), p)[0]["input_ids"])
    ]
    with pytest.raises(
        ManifestIndexError, match=r"other settings \(n_fft 400 -> 512, hop_length 160 -> 320\)"
    ):
        load_manifest(m, p320, index="require")
    with caplog.at_level(logging.WARNING):
        found = load_manifest(m, p320)
    assert (found.tokens < 0).all()  # counted anew, at hop 320
    # an index written before n_fft/hop_length were recorded
    settings = index_module.index_settings

    def unrecorded(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        out = settings(*args, **kwargs)
        del out["n_fft"], out["hop_length"]
        return out

    monkeypatch.setattr(index_module, "index_settings", unrecorded)
    build_index(m, p)
    monkeypatch.setattr(index_module, "index_settings", settings)
    assert (load_manifest(m, p, index="require").tokens >= 0).all()
    with pytest.raises(ManifestIndexError, match=r"hop_length 160 -> 320"):
        load_manifest(m, p320, index="require")
