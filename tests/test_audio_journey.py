"""The "my own audio and conversations" journey: files of every common kind decode to the reference's waveform and
features; segments are the whole file's samples; the window cap and resampling agree with the reference processor;
odd files (a header of 0 frames, NaN at another rate) and odd manifests give errors naming what is wrong."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from tiny_assets import PROCESSOR_CHAT_TEMPLATE, TOKENIZER_CHAT_TEMPLATE, write_tiny_tokenizer

import musicflamingo.audio.io as audio_io
from musicflamingo.audio.io import AudioError, load_audio
from musicflamingo.data.dataset import BadSampleError, ConversationDataset
from musicflamingo.data.manifest import JsonlRecords, ManifestError, read_manifest
from musicflamingo.processor import MusicFlamingoProcessor
from musicflamingo.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")
from transformers.audio_utils import load_audio as reference_load  # noqa: E402

CHUNK, KEPT = 2.0, 8.0  # 2-s windows, 4 of them kept: the 30-s / 20-min settings at a test's scale
CONV = [{"role": "user", "content": "<sound>What is it?"}, {"role": "assistant", "content": "Noise."}]


@pytest.fixture(scope="module")
def procs(tmp_path_factory) -> tuple[object, MusicFlamingoProcessor]:
    """The reference processor and ours, both with 2-s windows and an 8-s cap, from the same tokenizer files."""
    tok_dir = write_tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        str(tok_dir), chat_template=TOKENIZER_CHAT_TEMPLATE
    )
    fe = transformers.WhisperFeatureExtractor(
        feature_size=128, chunk_length=int(CHUNK), return_attention_mask=True
    )
    ref = transformers.MusicFlamingoProcessor(
        feature_extractor=fe, tokenizer=tokenizer, chat_template=PROCESSOR_CHAT_TEMPLATE, max_audio_len=KEPT
    )
    ours = MusicFlamingoProcessor(load_tokenizer(tok_dir), chunk_length=CHUNK, max_audio_len=KEPT)
    return ref, ours


def _noise(
    path: Path, seconds: float, sr: int, channels: int = 1, subtype: str = "FLOAT", seed: int = 0
) -> Path:
    x = np.random.default_rng(seed).standard_normal((int(round(seconds * sr)), channels)) * 0.2
    sf.write(str(path), np.clip(x, -1, 1).astype(np.float32), sr, subtype=subtype)
    return path


def _sample(tmp_path: Path, processor: MusicFlamingoProcessor, audio: object) -> dict:
    """The training sample of a one-record manifest whose `audio` field is `audio`."""
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "r", "audio": audio, "conversations": CONV}) + "\n")
    return ConversationDataset(read_manifest(manifest), processor)[0]


def _reference_features(ref: object, wave: np.ndarray) -> dict:
    conv = [{"role": "user", "content": [{"type": "audio", "audio": wave}, {"type": "text", "text": "Hm?"}]}]
    return ref.apply_chat_template(conv, tokenize=True, return_dict=True, add_generation_prompt=True)


@pytest.mark.parametrize(
    "name, subtype, channels, sr",
    [
        ("a.wav", "PCM_U8", 1, 8000),
        ("a.wav", "PCM_16", 2, 11025),
        ("a.wav", "PCM_24", 6, 22050),
        ("a.wav", "PCM_32", 2, 44100),
        ("a.wav", "FLOAT", 6, 48000),
        ("a.wav", "DOUBLE", 1, 96000),
        ("a.wav", "PCM_16", 1, 16000),
        ("a.flac", "PCM_24", 2, 44100),
        ("a.ogg", "VORBIS", 2, 22050),
        ("a.mp3", "MPEG_LAYER_III", 1, 8000),
        ("a.mp3", "MPEG_LAYER_III", 2, 44100),
    ],
)
def test_files_of_any_depth_channels_and_rate_decode_to_the_references_waveform(
    tmp_path, name, subtype, channels, sr
):
    """8-64 bit WAV, FLAC, Vorbis, MP3, mono to 5.1, 8-96 kHz: the samples of transformers' reader (soundfile +
    soxr), bit for bit."""
    path = _noise(tmp_path / name, 1.3, sr, channels, subtype)
    ours, theirs = load_audio(path), reference_load(str(path), 16000)
    assert ours.shape == theirs.shape == (20800,)
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("sr", [22050, 44100, 48000, 11111])
def test_a_segment_holds_the_whole_files_samples_and_features(tmp_path, procs, sr):
    """`{"path", "offset", "duration"}` of a file at another rate: the samples of the whole file decoded and
    resampled, cut at round(offset * 16000), so its features are the reference's on that cut (they were resampled
    on their own: the filter's edges put the first and last log-mel frames up to 0.4 off)."""
    ref, ours = procs
    path = _noise(tmp_path / "a.flac", 9.0, sr, 2, "PCM_24")
    full = reference_load(str(path), 16000)
    for offset, duration in ((1.0, 2.5), (3.3333, 1.7), (0.2, None)):
        start = round(offset * 16000)
        end = len(full) if duration is None else start + round(duration * 16000)
        seg = load_audio(path, offset=offset, duration=duration)
        assert seg.shape == (end - start,)
        np.testing.assert_allclose(seg, full[start:end], rtol=0, atol=1e-6)
    sample = _sample(tmp_path, ours, {"path": path.name, "offset": 3.3333, "duration": 3.1})
    expected = _reference_features(ref, full[53333 : 53333 + 49600])
    assert sample["input_features"].shape == expected["input_features"].shape == (2, 128, 200)
    assert (sample["input_features"] - expected["input_features"]).abs().max() <= 1e-4
    assert torch.equal(sample["input_features_mask"], expected["input_features_mask"].int())


def test_audio_past_the_cap_matches_the_reference_at_another_rate(tmp_path, procs, caplog):
    """A file longer than the kept windows (here 12.5 s for 4 windows of 2 s, as 25 min for 40 of 30 s), at
    44.1 kHz: inference and training keep the reference's 4 windows, number for number, and say so."""
    ref, ours = procs
    path = _noise(tmp_path / "long.wav", 12.5, 44100)
    expected = _reference_features(ref, reference_load(str(path), 16000))
    with caplog.at_level("WARNING", logger="musicflamingo"):
        inferred = ours.apply_chat_template(
            [
                {
                    "role": "user",
                    "content": [{"type": "audio", "path": str(path)}, {"type": "text", "text": "Hm?"}],
                }
            ]
        )
        trained = _sample(tmp_path, ours, path.name)
    for got in (inferred["input_features"], trained["input_features"]):
        assert got.shape == expected["input_features"].shape == (4, 128, 200)
        assert (got - expected["input_features"]).abs().max() <= 1e-4
    assert torch.equal(inferred["input_ids"], expected["input_ids"])
    said = [r.getMessage() for r in caplog.records if r.name.startswith("musicflamingo")]
    assert said == [f"Audio {path} lasts 12.5 s: keeping its first 8 s."] * 2  # inference, training


def _wav_claiming_zero_frames(path: Path, samples: np.ndarray) -> Path:
    """A 16-bit WAV whose RIFF and data sizes say 0 (a recorder stopped before it wrote them), data present."""
    fmt = struct.pack("<HHIIHH", 1, 1, 16000, 32000, 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", 0)
    path.write_bytes(b"RIFF" + struct.pack("<I", 0) + body + (samples * 32767).astype("<i2").tobytes())
    return path


def test_a_wav_whose_header_says_zero_frames_is_read_by_ffmpeg(tmp_path, monkeypatch):
    """libsndfile reads nothing from such a file (it was "audio is empty"); ffmpeg reads its data."""
    wave = np.random.default_rng(0).uniform(-0.5, 0.5, 16000).astype(np.float32)
    path = _wav_claiming_zero_frames(tmp_path / "rec.wav", wave)
    if shutil.which("ffmpeg") is not None:
        np.testing.assert_allclose(load_audio(path), wave, atol=1e-4)
        assert load_audio(path, offset=0.25, duration=0.5).shape == (8000,)
        with pytest.raises(AudioError, match=r"rec\.wav: audio is empty \(0 samples after 5\.0 s\)"):
            load_audio(path, offset=5.0)  # was "in [5.0, 5.0) s"
    monkeypatch.setattr(audio_io.shutil, "which", lambda name: None)
    with pytest.raises(AudioError, match=r"rec\.wav: audio is empty \(0 samples by its header; .*ffmpeg"):
        load_audio(path)


def test_a_non_finite_sample_is_named_where_it_is_in_the_file(tmp_path):
    """At 44.1 kHz one NaN spread over ~500 resampled samples and was reported at a 16-kHz index."""
    x = np.random.default_rng(0).standard_normal(44100).astype(np.float32) * 0.1
    x[7000] = np.nan
    sf.write(str(tmp_path / "nan.wav"), x, 44100, subtype="FLOAT")
    with pytest.raises(
        AudioError,
        match=r"nan\.wav: audio has 1 non-finite samples \(NaN or inf\), first at 0\.159 s \(sample 7000 at",
    ):
        load_audio(tmp_path / "nan.wav")


def test_segments_and_the_cap_in_training_samples(tmp_path, procs):
    """Past the end: a bad sample naming id, file:line and the offset; across the cap: cut to the kept windows."""
    _, ours = procs
    path = _noise(tmp_path / "a.wav", 12.0, 16000)
    with pytest.raises(
        BadSampleError, match=r"sample 'r' \(.*m\.jsonl:1\): .*a\.wav: offset 20\.000 s is past"
    ):
        _sample(tmp_path, ours, {"path": path.name, "offset": 20.0})
    sample = _sample(tmp_path, ours, {"path": path.name, "offset": 1.0, "duration": 10.0})
    assert sample["input_features"].shape[0] == 4 and sample["num_audio_tokens"] == 4 * 50
    short = _sample(tmp_path, ours, {"path": path.name, "offset": 11.0, "duration": 10.0})
    assert short["input_features"].shape[0] == 1  # 1 s left


def test_af3_special_token_error_names_the_value_field(tmp_path):
    rec = {
        "sound": "a.wav",
        "conversations": [{"from": "human", "value": "<sound>\nQ"}, {"from": "gpt", "value": "A<|im_end|>"}],
    }
    path = tmp_path / "af3.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    with pytest.raises(
        ManifestError, match=r"af3\.jsonl:1: conversations\[1\]\.value contains the special token"
    ):
        read_manifest(path)


@pytest.mark.parametrize("reader", [read_manifest, lambda p: list(JsonlRecords(p))], ids=["read", "jsonl"])
def test_a_record_written_over_several_lines_is_named_as_such(tmp_path, reader):
    """`json.dump(record, f, indent=2)` gave "malformed JSON at column 2: Expecting property name" on valid JSON."""
    rec = {"id": "a", "audio": "a.wav", "conversations": CONV}
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(rec) + "\n" + json.dumps(rec, indent=2) + "\n")
    with pytest.raises(
        ManifestError, match=r"m\.jsonl:2: malformed JSON .*a record written over several lines"
    ):
        reader(path)
    path.write_text(json.dumps(rec) + '\n{"id": "b", "conversations": [}\n')  # broken, not spread: no hint
    with pytest.raises(ManifestError, match=r"m\.jsonl:2: malformed JSON at column 31: Expecting value$"):
        reader(path)
