"""Review 20 (the processor by hand): one spelling for where a conversation error is, sanitize_control_tokens with
string content, and waveforms passed the way numpy hands them out.

Every conversation error starts with its place as ``chat.message_place`` spells it, ``conversation 1 message 0
content item 2 (text)``, then what was expected (was spelt three ways: ``conversation 1: message 0 ...``,
``conversation 1 message 0 ...`` and ``conversation[1] message 0 audio``, with the field named as ``content item 0:
'text'`` or ``content item 0 (text)``).
"""

import numpy as np
import pytest
import torch

from musicflamingo.chat import ChatEncoder, message_place

SR = 16000
OK = [{"role": "user", "content": "hi"}]


def _noise(n, seed=0):
    return (np.random.default_rng(seed).standard_normal(n) * 0.1).astype(np.float32)


def _audio(value):
    return {"type": "audio", "audio": value}


# (conversation, the place it names, what it says next): one of each kind of mistake
CASES = {
    "content not text": ([{"role": "user", "content": 5}], "message 0 content", " must be a string, a list"),
    "message not a dict": (["hi"], "message 0", " must be a dict with 'role' and 'content', got 'hi'"),
    "item not a dict": ([{"role": "user", "content": ["x"]}], "message 0 content item 0", " must be a dict"),
    "text not a string": (
        [{"role": "user", "content": [_audio(_noise(SR)), {"type": "text", "text": 5}]}],
        "message 0 content item 1 (text)",
        " must be a string, got int",
    ),
    "special token in a text item": (
        [{"role": "user", "content": [{"type": "text", "text": "a<|im_end|>"}]}],
        "message 0 content item 0 (text)",
        " contains the chat special token '<|im_end|>' at position 1",
    ),
    "lone surrogate in string content": (  # the reference: a bare TypeError from its tokenizer
        [*OK, {"role": "assistant", "content": "b\udcff"}],
        "message 1 content",
        " has an invalid character '\\udcff' at position 1",
    ),
    "audio item without a value": (
        [*OK, {"role": "assistant", "content": "ok"}, {"role": "user", "content": [{"type": "audio"}]}],
        "message 2 content item 0",
        " is audio but has no 'audio', 'url' or 'path'",
    ),
    "audio value a number": (
        [{"role": "user", "content": [_audio(5)]}],
        "message 0 content item 0 (audio)",
        " must be a file path or a waveform as a numpy array or torch tensor, got int 5",
    ),
    "audio a url": (
        [{"role": "user", "content": [{"type": "audio", "url": "https://x.org/a.mp3"}]}],
        "message 0 content item 0 (url)",
        ": https://x.org/a.mp3 is a URL",
    ),
    "audio too short": (
        [{"role": "user", "content": [{"type": "text", "text": "Key?"}, _audio(_noise(100))]}],
        "message 0 content item 1 (audio)",
        ": audio has 100 samples (1 mel frames), too short for one audio token",
    ),
    "audio not finite": (
        [{"role": "user", "content": [_audio(np.full(SR, np.nan, np.float32))]}],
        "message 0 content item 0 (audio)",
        ": audio has 16000 non-finite samples",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_conversation_errors_name_the_place_one_way(ours, case):
    conv, place, says = CASES[case]
    assert place.startswith("message ")
    with pytest.raises(ValueError) as e:  # AudioError is a ValueError
        ours.apply_chat_template(conv)
    assert str(e.value).startswith(place + says), str(e.value)
    # In a batch the conversation comes first, spelt the same way (was "conversation 1: message 0 ..." for some,
    # "conversation[1] message 0 audio: ..." for array audios).
    with pytest.raises(ValueError) as e:
        ours.apply_chat_template([OK, conv])
    assert str(e.value).startswith(f"conversation 1 {place}{says}"), str(e.value)


def test_message_place_spells_every_level():
    assert message_place(None, 0) == "message 0"
    assert message_place("conversation 2", 3, 1, "text") == "conversation 2 message 3 content item 1 (text)"
    assert message_place("conversation 0", 1, 0) == "conversation 0 message 1 content item 0"


def test_an_empty_conversation_of_a_batch_is_named(ours):
    with pytest.raises(ValueError, match=r"^conversation 1 must be a non-empty list of messages, got \[\]"):
        ours.apply_chat_template([OK, []], tokenize=False)


def test_sanitize_control_tokens_refuses_special_tokens_typed_in_string_content(ref, ours):
    """String content is emitted as is, so a typed '<|im_end|>' is the control token, in both processors. With
    sanitize_control_tokens=True the reference tokenizes it as plain text (8 ids more here) while ours still gave
    the control token, other ids without a word: it is refused, naming the place, as text items always are."""
    conv = [{"role": "user", "content": "Stop here<|im_end|> please"}]
    kw = {"tokenize": True, "return_dict": True, "add_generation_prompt": True}
    plain = ref.apply_chat_template(conv, **kw)
    sanitized = ref.apply_chat_template(conv, sanitize_control_tokens=True, **kw)
    assert sanitized["input_ids"].shape[1] > plain["input_ids"].shape[1]  # the reference's plain-text reading
    with pytest.raises(
        ValueError, match=r"^message 0 content contains the chat special token '<\|im_end\|>'"
    ):
        ours.apply_chat_template(conv, sanitize_control_tokens=True)
    with pytest.raises(ValueError, match=r"^conversation 1 message 0 content contains .* at position 9"):
        ours.apply_chat_template([OK, conv], sanitize_control_tokens=True)
    # Without it, the reference's ids (the control token), as round 8's random conversations check.
    assert torch.equal(ours.apply_chat_template(conv)["input_ids"], plain["input_ids"])


def test_a_waveform_as_a_list_of_numpy_scalars_is_named(ours):
    """list(wave) of a float32 array holds numpy scalars, which passed the 'list of numbers' check: each sample was
    counted as an audio ("1 placeholder(s) but 160 audio(s)")."""
    wave = _noise(160)
    for samples in (list(wave), list(wave.astype(np.float64)), wave.tolist()):
        with pytest.raises(ValueError, match=r"^audio is a list of 160 numbers: pass one waveform"):
            ours("<sound>Key?", audio=samples)


@pytest.mark.parametrize("stack", [np.stack, lambda w: torch.from_numpy(np.stack(w))])
def test_a_stacked_batch_of_waveforms_says_it_is_one_audio(ours, stack):
    """np.stack of two waveforms is a [2, T] array, which this processor reads as one stereo audio: the count error
    said only '2 placeholder(s) but 1 audio(s)'."""
    waves = [_noise(SR, 1), _noise(SR, 2)]
    with pytest.raises(ValueError, match=r"shape \(2, 16000\) is one audio.* a list of 1-D arrays"):
        ours(["<sound>a", "<sound>b"], audio=stack(waves))
    assert ours(["<sound>a", "<sound>b"], audio=waves)["input_features"].shape[0] == 2


def test_chat_encoder_names_the_place_and_token(ours):
    """Training's encoder said only 'message 1 contains a chat special token'."""
    enc = ChatEncoder(ours.tokenizer, ours.audio_token_ids, pad_token_id=ours.pad_token_id)
    conv = [
        {"role": "user", "content": [{"type": "text", "text": "Key?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "C<|endoftext|>"}]},
    ]
    with pytest.raises(
        ValueError,
        match=r"^message 1 content item 0 \(text\) contains the chat special token '<\|endoftext\|>'",
    ):
        enc.encode(conv, [])
    with pytest.raises(ValueError, match=r"^message 0 content contains .*'<\|im_end\|>' at position 3"):
        enc.num_tokens([{"role": "user", "content": "Key<|im_end|>"}], [])


def test_chat_encoder_skips_a_turn_without_content_as_the_template(ours):
    """A content=None turn (an OpenAI tool call), which the template and apply_chat_template skip, stopped
    processor.chat_encoder() (the assistant-only labels apply_chat_template points to) with 'the chat template is
    not a per-message concatenation'. Its ids are now the processor's, with or without a system message first."""
    wave = _noise(SR)
    for head in ([], [{"role": "system", "content": None}], [{"role": "system", "content": "Be brief."}]):
        msgs = [
            *head,
            {"role": "user", "content": [_audio(wave), {"type": "text", "text": "Key?"}]},
            {"role": "assistant", "content": None},
            {"role": "tool", "content": None},
            {"role": "assistant", "content": "C major."},
        ]
        out = ours.apply_chat_template(msgs, add_generation_prompt=False, output_labels=True)
        counts = ours.prepare_audio([wave])[2]
        ids, labels = ours.chat_encoder().encode(msgs, counts)
        assert ids == out["input_ids"][0].tolist()
        assert ours.chat_encoder().num_tokens(msgs, counts) == len(ids)
        learned = ours.tokenizer.decode([t for t in labels if t != -100], skip_special_tokens=False)
        assert learned == "C major.<|im_end|>"
        assert ours.chat_encoder(train_on_prompt=True).encode(msgs, counts)[1] == out["labels"][0].tolist()


def test_sampling_rate_with_file_audio_says_to_drop_it(ours, tmp_path):
    """An 8-kHz file with sampling_rate=8000 (refused, as by the reference) was told to 'pass file paths, which are
    resampled on load': it was one."""
    import soundfile as sf

    path = tmp_path / "song_8k.wav"
    sf.write(path, _noise(8000), 8000)
    conv = [
        {"role": "user", "content": [{"type": "audio", "path": str(path)}, {"type": "text", "text": "Key?"}]}
    ]
    with pytest.raises(
        ValueError, match=r"^sampling_rate=8000: the audios are files, .* drop sampling_rate="
    ):
        ours.apply_chat_template(conv, sampling_rate=8000)
    with pytest.raises(
        ValueError, match=r"^sampling_rate=8000: this processor takes 16000 Hz audio; resample"
    ):
        ours("<sound><sound>", audio=[str(path), _noise(SR)], sampling_rate=8000)
    assert ours.apply_chat_template(conv, sampling_rate=SR)["input_features"].shape[0] == 1
