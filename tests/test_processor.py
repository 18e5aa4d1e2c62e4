"""MusicFlamingoProcessor parity with transformers' MusicFlamingoProcessor built from the same tokenizer files."""

import logging

import numpy as np
import pytest
import torch
from tiny_assets import (
    PROCESSOR_CHAT_TEMPLATE,
    SYSTEM_PROMPT,
    TINY_IDS,
    write_audio,
)

from musicflamingo.audio.io import AudioError
from musicflamingo.chat import DEFAULT_SYSTEM_PROMPT, build_chat_template, expand_audio_tokens
from musicflamingo.processor import MusicFlamingoProcessor

transformers = pytest.importorskip("transformers")


def _noise(n, seed, scale=0.1):
    return np.random.default_rng(seed).standard_normal(n, dtype=np.float32) * np.float32(scale)


def _conv(audio, question):
    return [
        {"role": "user", "content": [{"type": "audio", "audio": audio}, {"type": "text", "text": question}]}
    ]


def _assert_same(r, o):
    assert sorted(r.keys()) == sorted(o.keys())
    for k in ("input_ids", "attention_mask", "labels", "input_features_mask"):
        if k in r:
            assert o[k].dtype == r[k].dtype, k
            assert torch.equal(o[k], r[k]), k
    if "input_features" in r:
        assert o["input_features"].dtype == torch.float32
        assert o["input_features"].shape == r["input_features"].shape
        assert (o["input_features"] - r["input_features"]).abs().max() <= 1e-4


def _ref_chat(ref, convs):
    return ref.apply_chat_template(
        convs,
        tokenize=True,
        return_dict=True,
        add_generation_prompt=True,
        processor_kwargs={"output_labels": True},
    )


def test_template_and_prompt(ours):
    assert DEFAULT_SYSTEM_PROMPT == SYSTEM_PROMPT and "regardlenss" in DEFAULT_SYSTEM_PROMPT
    assert build_chat_template() == PROCESSOR_CHAT_TEMPLATE
    assert ours.default_system_prompt == SYSTEM_PROMPT
    assert (ours.audio_token_id, ours.audio_bos_token_id, ours.audio_eos_token_id) == (300, 301, 302)
    assert (ours.pad_token_id, ours.eos_token_id) == (TINY_IDS.pad_token_id, TINY_IDS.eos_token_id)
    text = ours.render_chat(
        [{"role": "user", "content": [{"type": "text", "text": "What?"}, {"type": "audio", "path": "x.wav"}]}]
    )
    assert text == (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n<sound>What?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_batch_two_audios(ref, ours):
    a1, a2 = _noise(35 * 16000, 0), _noise(112077, 1)
    convs = [_conv(a1, "Describe this track."), _conv(a2, "What key is it in?\nAnswer briefly.")]
    r, o = _ref_chat(ref, convs), ours.apply_chat_template(convs, output_labels=True)
    _assert_same(r, o)
    assert o["input_features"].shape == (3, 128, 3000)
    assert (o["input_ids"] == TINY_IDS.audio_token_id).sum(1).tolist() == [875, 175]
    assert o["attention_mask"][1, 0] == 0  # the shorter row is left padded
    # __call__ with rendered text gives the same as apply_chat_template
    texts = [ours.render_chat(c) for c in convs]
    o2 = ours(texts, audio=[a1, torch.from_numpy(a2)], output_labels=True)
    _assert_same(o, o2)
    r2 = ref(text=texts, audio=[a1, a2], output_labels=True)
    _assert_same(r2, o2)


def test_multi_turn_with_assistant(ref, ours):
    convs = [
        {"role": "system", "content": "Be terse."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Hi "},
                {"type": "audio", "audio": _noise(40000, 2)},
                {"type": "text", "text": "what instrument?"},
            ],
        },
        {"role": "assistant", "content": "A piano.\nIn C major."},
        {"role": "user", "content": [{"type": "text", "text": "And the tempo?"}]},
    ]
    assert ours.apply_chat_template(convs, tokenize=False) == ref.apply_chat_template(
        convs, tokenize=False, add_generation_prompt=True
    )
    _assert_same(_ref_chat(ref, convs), ours.apply_chat_template(convs, output_labels=True))


def test_text_only(ref, ours):
    convs = [{"role": "user", "content": "Name three instruments."}]
    r, o = _ref_chat(ref, convs), ours.apply_chat_template(convs, output_labels=True)
    _assert_same(r, o)
    assert "input_features" not in o
    assert ours.decode(o["input_ids"][0]) == ref.decode(r["input_ids"][0], skip_special_tokens=True)
    assert ours.batch_decode(o["input_ids"], skip_special_tokens=False) == ref.batch_decode(r["input_ids"])


def test_labels_mask_only_audio_and_pad(ours):
    out = ours(
        ["<sound>hi", "a longer text with <sound> here"],
        audio=[_noise(1000, 3), _noise(5000, 4)],
        output_labels=True,
    )
    ids, labels = out["input_ids"], out["labels"]
    masked = labels == -100
    audio_like = torch.isin(ids, torch.tensor([300, 301, 302])) | (ids == TINY_IDS.pad_token_id)
    assert torch.equal(masked, audio_like)
    assert torch.equal(labels[~masked], ids[~masked])


def test_long_audio_truncated_to_40_windows(ref, ours, caplog):
    long = _noise(21 * 60 * 16000, 5, scale=1e-3)
    convs = _conv(long, "Summarize.")
    with caplog.at_level(logging.WARNING, logger="musicflamingo"):
        o = ours.apply_chat_template(convs, output_labels=True)
    ours_warnings = [r for r in caplog.records if r.name.startswith("musicflamingo")]
    assert len(ours_warnings) == 1 and "1260.0" in ours_warnings[0].getMessage()
    assert o["input_features"].shape == (40, 128, 3000)
    assert int((o["input_ids"] == 300).sum()) == 30000
    _assert_same(_ref_chat(ref, convs), o)


def test_audio_from_path(ref, ours, tmp_path):
    path = write_audio(tmp_path / "clip.wav", _noise(50000, 6), 16000)
    convs = [
        {"role": "user", "content": [{"type": "audio", "path": str(path)}, {"type": "text", "text": "Hm?"}]}
    ]
    o = ours.apply_chat_template(convs)
    assert int((o["input_ids"] == 300).sum()) == ours.audio_token_count(50000) == 78
    _assert_same(
        ref.apply_chat_template(convs, tokenize=True, return_dict=True, add_generation_prompt=True), o
    )


def test_placeholder_count_mismatch(ours):
    with pytest.raises(ValueError, match=r"2 '<sound>' placeholder.*1 audio"):
        ours(["<sound>a", "<sound>b"], audio=[_noise(1000, 0)])
    with pytest.raises(ValueError, match=r"1 '<sound>' placeholder.*0 audio"):
        ours("<sound>a")
    two_audios = [
        {
            "role": "user",
            "content": [
                {"type": "audio", "audio": _noise(100, 0)},
                {"type": "audio", "audio": _noise(100, 1)},
            ],
        }
    ]
    with pytest.raises(ValueError, match=r"1 '<sound>' placeholder.*2 audio"):
        ours.apply_chat_template(two_audios)
    # a short sources list (it was an IndexError from inside prepare_audio)
    with pytest.raises(ValueError, match=r"sources names 1 audio\(s\) but 2 were given"):
        ours(["<sound>a", "<sound>b"], audio=[_noise(1000, 0), _noise(1000, 1)], sources=["a.wav"])


def test_bad_audio_errors_name_the_source(ours, tmp_path):
    with pytest.raises(AudioError, match=r"missing\.wav.*not found"):
        ours.apply_chat_template(
            [{"role": "user", "content": [{"type": "audio", "path": str(tmp_path / "missing.wav")}]}]
        )
    bad = np.ones(1000, np.float32)
    bad[5] = np.nan
    with pytest.raises(AudioError, match=r"audio\[0\].*non-finite"):
        ours("<sound>x", audio=bad)
    with pytest.raises(ValueError, match="message 0"):
        ours.render_chat([{"content": "no role"}])


def test_helpers(ours):
    assert ours.audio_token_count(35 * 16000) == 875 and ours.audio_token_count(112077) == 175
    wins = ours.split_windows(np.zeros(35 * 16000, np.float32))
    feats, mask = ours.extract_features(wins)
    assert feats.shape == (2, 128, 3000) and mask.sum().item() == 3500
    assert expand_audio_tokens("a<sound>b", [2]) == "a<|sound_bos|><sound><sound><|sound_eos|>b"
    ids = ours("x", padding_side="right")["input_ids"]
    assert ids.shape == (1, 1)


def test_save_and_load_round_trip(ours, tmp_path):
    ours_dir = ours.save_pretrained(tmp_path / "ours")
    again = MusicFlamingoProcessor.from_pretrained(ours_dir)
    ref_loaded = transformers.MusicFlamingoProcessor.from_pretrained(str(ours_dir))
    convs = [_conv(_noise(20000, 7), "Genre?")]
    o = again.apply_chat_template(convs, output_labels=True)
    _assert_same(ours.apply_chat_template(convs, output_labels=True), o)
    _assert_same(_ref_chat(ref_loaded, convs), o)
    # A custom system prompt and a 10 s window survive the round trip.
    custom = MusicFlamingoProcessor(
        ours.tokenizer, chunk_length=10.0, max_audio_len=60, default_system_prompt="Hi."
    )
    again = MusicFlamingoProcessor.from_pretrained(custom.save_pretrained(tmp_path / "custom"))
    assert again.default_system_prompt == "Hi." and again.chunk_length == 10.0 and again.max_audio_len == 60
    assert again.apply_chat_template(_conv(_noise(25 * 16000, 8), "?"))["input_features"].shape == (
        3,
        128,
        1000,
    )


@pytest.mark.parametrize("tail", [1, 160, 320])
def test_zero_token_tail_is_cut_as_the_reference_on_the_cut_audio(ref, ours, tail):
    """30 s + 1..320 samples (a GTZAN clip: 30.013 s at 22.05 kHz) would end in a window of 0 audio tokens, whose
    RoTE time the model cannot place (IndexError): the tail is cut, and the result is the reference's on the cut
    audio (the token count is the same). 321 samples make a token: kept."""
    long, kept = _noise(480000 + tail, 7), _noise(480321, 8)
    o = ours.apply_chat_template([_conv(long, "Genre?"), _conv(kept, "Key?")], output_labels=True)
    r = _ref_chat(ref, [_conv(long[:480000], "Genre?"), _conv(kept, "Key?")])
    _assert_same(r, o)
    assert o["input_features"].shape[0] == 3 and ours.usable_samples(480000 + tail) == 480000
