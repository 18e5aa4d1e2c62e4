"""The chat format (musicflamingo/chat.py): rendering vs the reference template, labels, continuation, expansion."""

import ast
import sys
from pathlib import Path

import pytest
from tiny_assets import (
    PROCESSOR_CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    SYSTEM_PROMPT,
    TINY_IDS,
    TOKENIZER_CHAT_TEMPLATE,
    write_tiny_tokenizer,
)

from musicflamingo import chat
from musicflamingo.chat import (
    IGNORE_INDEX,
    ChatEncoder,
    build_chat_template,
    continuation_text,
    conversation,
    encode_expanded,
    expand_audio_tokens,
    format_options,
    option_letter,
    render_chat,
    template_system_prompt,
    user_message,
)
from musicflamingo.tokenizer import load_tokenizer

_ = IGNORE_INDEX
IM_START, IM_END, NL = TINY_IDS.im_start_id, TINY_IDS.eos_token_id, 198
SOUND, BOS, EOS = TINY_IDS.audio_token_id, TINY_IDS.audio_bos_token_id, TINY_IDS.audio_eos_token_id
AUDIO_IDS = (SOUND, BOS, EOS)

ASKED = [
    {"role": "system", "content": "Be brief."},
    user_message("Key?", "a.wav"),
    {"role": "assistant", "content": "C major."},
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(write_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def test_chat_is_a_leaf_module():
    """chat.py imports only the standard library, so every layer can import it without a cycle."""
    tree = ast.parse(Path(chat.__file__).read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import in chat.py"
            imported.add(node.module.split(".")[0])
    assert imported, "no imports found: the check would pass vacuously"
    assert not imported - set(sys.stdlib_module_names) - {"__future__"}, imported


def test_constants_match_the_reference():
    assert chat.SPECIAL_TOKENS == SPECIAL_TOKENS  # Qwen2 id order, as the tiny tokenizer lays them out
    assert chat.DEFAULT_SYSTEM_PROMPT == SYSTEM_PROMPT and "regardlenss" in chat.DEFAULT_SYSTEM_PROMPT
    assert build_chat_template() == PROCESSOR_CHAT_TEMPLATE
    assert set(chat.FORBIDDEN_TOKENS) == set(SPECIAL_TOKENS) - {chat.AUDIO_PLACEHOLDER}
    assert chat.ASSISTANT_HEADER == "<|im_start|>assistant\n" and chat.END_OF_TURN == "<|im_end|>"
    assert IGNORE_INDEX == -100


def test_template_system_prompt_round_trip():
    assert template_system_prompt(build_chat_template("Hi.")) == "Hi."
    assert template_system_prompt(PROCESSOR_CHAT_TEMPLATE) == SYSTEM_PROMPT
    assert template_system_prompt(TOKENIZER_CHAT_TEMPLATE) is None  # another shape
    assert template_system_prompt(build_chat_template("Hi.") + "{{ extra }}") is None


def test_render_hand_written():
    with_system = render_chat(ASKED, add_generation_prompt=False)
    assert with_system == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<sound>Key?<|im_end|>\n"
        "<|im_start|>assistant\nC major.<|im_end|>\n"
    )
    # no system message: the default prompt is added; text items are joined after one <sound>
    user = {
        "role": "user",
        "content": [{"type": "text", "text": "Hi "}, {"type": "audio", "path": "x"}, {"text": "there"}],
    }
    assert render_chat([user], system_prompt="S.") == (
        "<|im_start|>system\nS.<|im_end|>\n<|im_start|>user\n<sound>Hi there<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_chat([user]).startswith(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n")
    with pytest.raises(ValueError, match="non-empty list"):
        render_chat([])
    with pytest.raises(ValueError, match="message 0"):
        render_chat([{"content": "no role"}])


@pytest.mark.parametrize(
    "messages",
    [
        ASKED,
        [user_message("What?", "x.wav")],
        [user_message("Plain text only")],
        [
            {"role": "user", "content": "string <sound>content"},
            {"role": "assistant", "content": None},  # skipped, as the template's "is not none"
            {"role": "assistant", "content": "A piano.\nIn C major."},
            {"role": "user", "content": [{"type": "audio", "audio": "array"}, {"text": "and?"}]},
        ],
    ],
)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_equals_reference_jinja_template(messages, add_generation_prompt):
    """Rendered as transformers renders chat_template.jinja (same sandboxed environment settings)."""
    ext = pytest.importorskip("jinja2.ext")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[ext.loopcontrols])
    for prompt in (SYSTEM_PROMPT, "Short."):
        template = env.from_string(build_chat_template(prompt))
        expected = template.render(messages=messages, add_generation_prompt=add_generation_prompt)
        assert render_chat(messages, prompt, add_generation_prompt) == expected


def test_message_helpers():
    assert user_message("Q?") == {"role": "user", "content": [{"type": "text", "text": "Q?"}]}
    assert user_message("Q?", "a.wav")["content"] == [
        {"type": "audio", "path": "a.wav"},
        {"type": "text", "text": "Q?"},
    ]
    assert conversation("Q?", "a.wav") == [user_message("Q?", "a.wav")]
    assert conversation("Q?", None, "Be brief.") == [
        {"role": "system", "content": "Be brief."},
        user_message("Q?"),
    ]


def test_labels_hand_written_example(tok):
    """Only the assistant's content and its <|im_end|> are learned; audio tokens never are."""
    ids, labels = ChatEncoder(tok, AUDIO_IDS, pad_token_id=TINY_IDS.pad_token_id).encode(ASKED, [3])
    system = [IM_START, 82, 88, 82, 83, 68, 76, NL, 33, 68, 277, 81, 72, 68, 69, 13, IM_END, NL]  # Be brief.
    user = [IM_START, 290, 268, NL, BOS, SOUND, SOUND, SOUND, EOS, 42, 68, 88, 30, IM_END, NL]  # <sound>Key?
    head = [IM_START, 64, 82, 82, 264, 83, 293, 83, NL]  # <|im_start|>assistant\n
    answer = [34, 263, 64, 73, 266, 13, IM_END]  # C major.<|im_end|>
    assert ids == system + user + head + answer + [NL]
    assert labels == [_] * (18 + 15 + 9) + answer + [_]
    assert ChatEncoder(tok, AUDIO_IDS).num_tokens(ASKED, [3]) == len(ids)

    # train_on_prompt: every token except the five audio tokens
    everything = ChatEncoder(tok, AUDIO_IDS, train_on_prompt=True).encode(ASKED, [3])[1]
    assert everything == [_ if i in AUDIO_IDS else i for i in ids]
    assert everything.count(_) == 5


def test_labels_learn_every_assistant_turn_and_match_the_render(tok):
    messages = [
        user_message("Tempo?", "a.wav"),
        {"role": "assistant", "content": "96 BPM."},
        {"role": "user", "content": "<sound>Key?"},
        {"role": "assistant", "content": "C major."},
    ]
    ids, labels = ChatEncoder(tok, AUDIO_IDS).encode(messages, [2, 4])
    text = expand_audio_tokens(render_chat(messages, add_generation_prompt=False), [2, 4])
    assert ids == tok.encode(text)
    assert tok.decode([t for t in labels if t != _], False) == "96 BPM.<|im_end|>C major.<|im_end|>"


def test_default_system_turn_is_encoded_once(tok):
    """The default system turn's ids are made once per encoder, not per record, and the ids stay those of the whole
    rendered text; a tokenizer that does not split at <|im_start|> gets no such shortcut."""
    seen = []

    class Recording:
        def encode(self, text):
            seen.append(text)
            return tok.encode(text)

    enc = ChatEncoder(Recording(), AUDIO_IDS)
    seen.clear()
    messages = [user_message("Tempo?", "a.wav"), {"role": "assistant", "content": "96 BPM."}]
    for _ in range(3):
        ids, _labels = enc.encode(messages, [2])
    assert seen and not any(chat.DEFAULT_SYSTEM_PROMPT in text for text in seen)
    assert ids == tok.encode(expand_audio_tokens(render_chat(messages, add_generation_prompt=False), [2]))

    class Joining(Recording):  # ids depend on what precedes a turn: encode the whole text, always
        def encode(self, text):
            ids = super().encode(text)
            return ids + [NL] if text.count("<|im_start|>") > 1 else ids

    joining = ChatEncoder(Joining(), AUDIO_IDS)
    seen.clear()
    joining.encode(messages, [2])
    assert any(text.startswith(f"<|im_start|>system\n{chat.DEFAULT_SYSTEM_PROMPT}") for text in seen)


def test_encoder_rejects_bad_conversations(tok):
    enc = ChatEncoder(tok, AUDIO_IDS)
    with pytest.raises(ValueError, match="special token"):
        enc.encode([{"role": "user", "content": "a<|im_end|>b"}], [])
    with pytest.raises(ValueError, match="special token"):
        enc.encode([{"role": "user", "content": [{"type": "text", "text": "<|im_start|>"}]}], [])
    with pytest.raises(ValueError, match="more <sound>"):
        enc.encode(ASKED, [])
    with pytest.raises(ValueError, match="fewer <sound>"):
        enc.encode(ASKED, [3, 4])


@pytest.mark.parametrize("closed", [True, False])
@pytest.mark.parametrize("system_prompt", [SYSTEM_PROMPT, "Other."])
def test_continuation_is_the_suffix_of_the_full_render(closed, system_prompt):
    for history in (ASKED, ASKED[1:]):  # with a system message, and with the default one
        new = user_message("And the tempo?", "b.wav")
        cont = continuation_text(history, new, previous_answer_closed=closed, system_prompt=system_prompt)
        before = render_chat(history, system_prompt, add_generation_prompt=False)
        # the cache ends with the answer's own tokens: "<|im_end|>" only when generation emitted it
        cached = before.removesuffix("\n") if closed else before.removesuffix("<|im_end|>\n")
        assert cached != before
        assert cached + cont == render_chat([*history, new], system_prompt)
    assert cont == (
        ("\n" if closed else "<|im_end|>\n")
        + "<|im_start|>user\n<sound>And the tempo?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_expand_audio_tokens_and_encode_expanded(tok):
    text = "a<sound>b <sound>"
    assert expand_audio_tokens(text, [2, 1]) == (
        "a<|sound_bos|><sound><sound><|sound_eos|>b <|sound_bos|><sound><|sound_eos|>"
    )
    assert encode_expanded(tok, text, [2, 1], AUDIO_IDS) == tok.encode(expand_audio_tokens(text, [2, 1]))
    assert encode_expanded(tok, text, [2, 1], AUDIO_IDS).count(SOUND) == 3
    with pytest.raises(ValueError, match="2 '<sound>' placeholder"):
        expand_audio_tokens(text, [1])


def test_format_options_layouts():
    assert format_options(["x", "y"]) == "(A) x\n(B) y"  # eval prompts: one option per line
    assert format_options(["60 BPM", "90 BPM"], sep=" ") == "(A) 60 BPM (B) 90 BPM"  # synthetic corpus
    assert option_letter(25) == "Z"
    with pytest.raises(ValueError, match="no letter"):
        option_letter(26)
