"""Review 16 (processor edges): what real songs and conversations look like, against the reference processor.

A folder whose feature extractor has another STFT hop or FFT size (``preprocessor_config.json``) is featurized as the
reference does (ours used 160/400 whatever the folder said); malformed inputs are named instead of bare
``TypeError``s; audio of exactly N windows, N windows + 1 sample and stereo integer PCM in either layout, and a batch
against its rows one at a time.
"""

import numpy as np
import pytest
import torch

from musicflamingo.chat import render_chat
from musicflamingo.processor import MusicFlamingoProcessor

transformers = pytest.importorskip("transformers")

SR = 16000
W = 30 * SR  # one window


def _noise(n, seed, scale=0.1):
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


def _one(audio, text="Key?"):
    return [{"role": "user", "content": [{"type": "audio", "audio": audio}, {"type": "text", "text": text}]}]


def _ref_chat(ref, conv, **processor_kwargs):
    return ref.apply_chat_template(
        conv, tokenize=True, return_dict=True, add_generation_prompt=True, processor_kwargs=processor_kwargs
    )


def _assert_same(r, o, where=""):
    assert sorted(r.keys()) == sorted(o.keys()), where
    for k in r:
        assert o[k].dtype == r[k].dtype and o[k].shape == r[k].shape, (where, k)
        if k == "input_features":
            assert (o[k] - r[k]).abs().max() <= 1e-4, (where, k)
        else:
            assert torch.equal(o[k], r[k]), (where, k)


# ------------------------------------------------------------------------------------ feature extractor settings
def test_folder_hop_length_and_n_fft_are_used_as_the_reference(ref_dir, tmp_path):
    """A processor folder whose WhisperFeatureExtractor has hop_length=320 and n_fft=512 (a lighter front end for a
    from-scratch encoder): ours built its extractor with 160/400 whatever the folder said (3000 frames a window
    instead of the reference's 1500, twice the <sound> tokens), and save_pretrained wrote 160/400 back."""
    from transformers import WhisperFeatureExtractor

    base = transformers.MusicFlamingoProcessor.from_pretrained(str(ref_dir))
    fe = WhisperFeatureExtractor(feature_size=128, return_attention_mask=True, hop_length=320, n_fft=512)
    ref = transformers.MusicFlamingoProcessor(
        feature_extractor=fe, tokenizer=base.tokenizer, chat_template=base.chat_template
    )
    ref.save_pretrained(str(tmp_path / "hop320"))
    ref = transformers.MusicFlamingoProcessor.from_pretrained(str(tmp_path / "hop320"))
    ours = MusicFlamingoProcessor.from_pretrained(tmp_path / "hop320")
    assert (ours.feature_extractor.hop_length, ours.feature_extractor.n_fft) == (320, 512)

    audios = [_noise(50000, 0), _noise(W + 5000, 1)]
    convs = [_one(audios[0]), _one(audios[1], "Tempo?")]
    _assert_same(
        _ref_chat(ref, convs, output_labels=True), ours.apply_chat_template(convs, output_labels=True)
    )
    o = ours.apply_chat_template(convs)
    assert o["input_features"].shape == (3, 128, 1500)
    counts = (o["input_ids"] == ours.audio_token_id).sum(dim=1).tolist()
    assert counts == [ours.audio_token_count(a.shape[0]) for a in audios]

    # The zero-token tail past a window is <= 2 frames of 320 samples now: 640 samples are cut, 641 kept.
    assert ours.usable_samples(W + 640) == W and ours.usable_samples(W + 641) == W + 641
    long = _noise(W + 640, 2)
    _assert_same(_ref_chat(ref, _one(long[:W])), ours.apply_chat_template(_one(long)))

    saved = MusicFlamingoProcessor.from_pretrained(ours.save_pretrained(tmp_path / "again"))
    assert (saved.feature_extractor.hop_length, saved.feature_extractor.n_fft) == (320, 512)


# ------------------------------------------------------------------------------------ malformed input, named
def test_content_that_is_not_a_string_or_list_is_named(ours):
    """content 5 was a bare TypeError ('int' object is not iterable); a dict content blamed its keys ('content item
    0 must be a dict, got str')."""
    with pytest.raises(
        ValueError, match=r"message 1 content must be a string, a list of content items or None, got int"
    ):
        ours.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}])
    with pytest.raises(ValueError, match=r"message 0 content must be .* got dict"):
        render_chat([{"role": "user", "content": {"type": "text", "text": "hi"}}])


def test_text_none_is_named(ours):
    """processor(None) was a bare TypeError ('NoneType' object is not iterable)."""
    with pytest.raises(
        ValueError, match=r"text must be a string or a non-empty list of strings, got NoneType"
    ):
        ours(None)


def test_audio_dict_and_list_of_numbers_are_named(ours):
    """A `datasets` audio dict counted its keys as audios ('2 audio(s) were given'), a waveform as a list of floats
    each sample ('4000 audio(s) were given'), and an object that is not a list was a bare TypeError."""
    wave = _noise(4000, 3)
    with pytest.raises(
        ValueError, match=r"audio is a dict \(keys \['array', 'sampling_rate'\]\), not a waveform"
    ):
        ours("<sound>Key?", audio={"array": wave, "sampling_rate": 44100})
    with pytest.raises(
        ValueError, match=r"audio is a list of 4000 numbers: pass one waveform as a numpy array"
    ):
        ours("<sound>Key?", audio=wave.tolist())
    with pytest.raises(ValueError, match=r"audio must be a file path, a numpy array .* got object"):
        ours("<sound>Key?", audio=object())  # e.g. a `datasets` AudioDecoder: 'object' is not iterable
    # A list of waveforms is still a list of audios.
    assert ours("<sound>a<sound>b", audio=[wave, wave])["input_features"].shape[0] == 2


def test_array_audio_errors_name_their_conversation_and_message(ours):
    """Every array audio was named "conversation[0] audio": with two in a conversation, a too-short one could not be
    told from the other."""
    long, short = _noise(40000, 8), _noise(100, 9)
    conv = [*_one(long), {"role": "assistant", "content": "A."}, *_one(short, "And this?")]
    with pytest.raises(
        ValueError, match=r"^message 2 content item 0 \(audio\): audio has 100 samples .* too short"
    ):
        ours.apply_chat_template(conv)
    with pytest.raises(
        ValueError, match=r"^conversation 1 message 2 content item 0 \(audio\): audio has 100 samples"
    ):
        ours.apply_chat_template([_one(long), conv])


def test_placeholder_typed_in_string_content_is_named(ref, ours):
    """A user's question "What is <sound>?" as string content: the reference refuses it ("Found 1 <sound> tokens
    in the text but no audio inputs"), as ours did with a count that named neither the message nor the cause; with
    an audio item elsewhere the counts were 2 and 1. Now the message and the placeholder are named."""
    question = [{"role": "user", "content": "What is <sound>?"}]
    with pytest.raises(ValueError, match="no audio inputs"):
        _ref_chat(ref, question)
    with pytest.raises(
        ValueError, match=r"^message 0 content holds the audio placeholder '<sound>' as typed text"
    ):
        ours.apply_chat_template(question)
    conv = [*_one(_noise(8000, 10)), {"role": "assistant", "content": "I hear <sound> effects."}]
    with pytest.raises(ValueError, match=r"^conversation 1 message 1 content holds .* \(position 7\)"):
        ours.apply_chat_template([_one(_noise(8000, 11)), conv], add_generation_prompt=False)
    # Typed into a text item it was already refused by name; rendering alone (tokenize=False) still works.
    with pytest.raises(
        ValueError, match=r"message 0 content item 1 \(text\) contains the chat special token"
    ):
        ours.apply_chat_template(_one(_noise(8000, 12), "What is <sound>?"))
    assert ours.apply_chat_template(question, tokenize=False) == ref.apply_chat_template(
        question, tokenize=False, add_generation_prompt=True
    )


# ------------------------------------------------------------------------------------ lengths and layouts
@pytest.mark.parametrize("n", [2 * W, 3 * W, 2 * W + 1])
def test_whole_windows_and_one_sample_over_match_the_reference(ref, ours, n):
    """Exactly 60 s and 90 s are 2 and 3 full windows as the reference; 60 s + 1 sample is the reference on the
    first 60 s (the 1-sample window would have 0 tokens: cut, same token count)."""
    x = _noise(n, n)
    r = _ref_chat(ref, _one(x[: n - n % W] if n % W else x))
    o = ours.apply_chat_template(_one(x))
    _assert_same(r, o, n)
    assert o["input_features"].shape[0] == n // W
    assert int((o["input_ids"] == ours.audio_token_id).sum()) == ours.audio_token_count(n) == 750 * (n // W)


def test_stereo_int16_in_either_layout_is_the_mono_mean(ref, ours):
    """[2, T] and [T, 2] int16 arrays are averaged to mono after PCM scaling (the reference fails on 2-D arrays):
    the same as the reference fed the float mono mean."""
    left, right = (_noise(50000, 6) * 20000).astype(np.int16), (_noise(50000, 7) * 20000).astype(np.int16)
    mono = (left.astype(np.float32) / 32768 + right.astype(np.float32) / 32768) / 2
    r = _ref_chat(ref, _one(mono))
    _assert_same(r, ours.apply_chat_template(_one(np.stack([left, right]))), "channel-first")
    _assert_same(r, ours.apply_chat_template(_one(np.stack([left, right], axis=1))), "channel-last")


def test_batch_rows_equal_each_conversation_alone(ours):
    """A batch (different audio lengths, a text-only row, a system prompt, a multi-turn row) gives each row what
    the conversation gives alone: same ids under the mask, same windows, pads only on the padding side."""
    a, b = _noise(40000, 4), _noise(W + 9000, 5)
    convs = [
        _one(a),
        [{"role": "system", "content": "Be brief."}, *_one(b, "Tempo?")],
        [
            {"role": "user", "content": "No audio."},
            {"role": "assistant", "content": "OK."},
            {"role": "user", "content": "Hi"},
        ],
    ]
    alone = [ours.apply_chat_template(c, output_labels=True) for c in convs]
    windows = torch.cat([x["input_features"] for x in alone if "input_features" in x])
    for side in ("left", "right"):
        batch = ours.apply_chat_template(convs, padding_side=side, output_labels=True)
        assert torch.equal(batch["input_features"], windows)
        positions = torch.arange(batch["input_ids"].shape[1])
        for i, one in enumerate(alone):
            m, n = batch["attention_mask"][i].bool(), one["input_ids"].shape[1]
            assert torch.equal(m, positions.flip(0) < n if side == "left" else positions < n)
            assert torch.equal(batch["input_ids"][i][m], one["input_ids"][0])
            assert torch.equal(batch["labels"][i][m], one["labels"][0])


def test_decode_takes_what_the_reference_decode_takes(ref, ours):
    """processor.decode(generate's [B, S] output) gave a bare TypeError (int() of a list), as did one id; the
    reference decodes a batch to one string per row and one id to its text."""
    ids = ours.tokenizer.encode("<|im_start|>assistant\nC major.<|im_end|>")
    batch = torch.tensor([ids, ids])
    for x in (
        batch,
        batch.tolist(),
        batch.numpy(),
        list(batch),
        batch[0],
        list(batch[0]),
        batch[0, 3],
        ids[3],
    ):
        for skip in (True, False):
            assert ours.decode(x, skip_special_tokens=skip) == ref.decode(x, skip_special_tokens=skip), (
                x,
                skip,
            )
    assert ours.batch_decode(list(batch)) == ref.batch_decode(batch, skip_special_tokens=True)
