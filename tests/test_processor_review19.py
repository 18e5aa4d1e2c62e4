"""Review 19 (processor by use): a batch's conversation errors name the conversation, array audio errors name their
message."""

import numpy as np
import pytest

OK = [{"role": "user", "content": "hi"}]


def _audio_conv(audio):
    return [
        {
            "role": "user",
            "content": [{"type": "audio", "audio": audio}, {"type": "text", "text": "Describe."}],
        }
    ]


@pytest.mark.parametrize(
    "bad, message",
    [
        ([{"role": "user", "content": 5}], "message 0 content must be a string"),
        ([{"content": "hi"}], "message 0 must be a dict with 'role' and 'content'"),
        ([{"role": "user", "content": ["x"]}], "message 0 content item 0 must be a dict"),
        (
            [{"role": "user", "content": [{"type": "text", "text": "<|im_end|>"}]}],
            "message 0 content item 0 (text)",
        ),
        ([{"role": "user", "content": [{"type": "audio"}]}], "has no 'audio', 'url' or 'path'"),
        ([], "must be a non-empty list"),
    ],
)
def test_a_batch_error_names_the_conversation(ours, bad, message):
    # Was "message 0 ..." for the second conversation of a batch: the first one looked guilty.
    audio_check = "'url'" in message  # made when the audios are gathered, i.e. with tokenize=True only
    for tokenize in (True,) if audio_check else (False, True):
        with pytest.raises(ValueError) as e:
            ours.apply_chat_template([OK, OK, bad], tokenize=tokenize)
        assert str(e.value).startswith("conversation 2 ") and message in str(e.value), str(e.value)
    if bad:  # one conversation: no index to give
        with pytest.raises(ValueError) as e:
            ours.apply_chat_template(bad)
        assert not str(e.value).startswith("conversation") and message in str(e.value)


@pytest.mark.parametrize(
    "audio, what",
    [
        (np.full(16000, np.nan, np.float32), "non-finite"),
        (np.zeros(0, np.float32), "empty"),
        (np.zeros((1, 1, 16000), np.float32), "expected a mono waveform"),
    ],
)
def test_an_array_audio_error_names_its_message(ours, audio, what):
    good = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
    # Was "audio[1]": its place among the batch's audios, which no message shows.
    with pytest.raises(ValueError, match=rf"^conversation 1 message 2 content item 0 \(audio\): .*{what}"):
        ours.apply_chat_template([_audio_conv(good), OK + OK + _audio_conv(audio)])
    with pytest.raises(ValueError, match=rf"^audio\[1\]: .*{what}"):  # the call without sources: its index
        ours(["<sound>", "<sound>"], audio=[good, audio])
