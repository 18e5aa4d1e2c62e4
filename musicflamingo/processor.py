"""MusicFlamingoProcessor: chat template, audio windows -> log-mel, ``<sound>`` expansion, padding and labels.

Reproduces ``transformers.MusicFlamingoProcessor`` (reference spec §3) without importing transformers:

* each audio is cut into ``chunk_length``-s windows (at most ``max_audio_len // chunk_length``), all windows of the
  batch go through one log-mel call -> ``input_features [W, 128, F]`` float32, ``input_features_mask [W, F]`` int32;
* the i-th ``<sound>`` of the batch (row-major) becomes ``<|sound_bos|>`` + ``<sound>`` * N_i + ``<|sound_eos|>``,
  ``N_i = ((L-1)//2 + 1 - 2)//2 + 1`` with ``L`` the valid mel frames of audio i;
* rows are left-padded with the pad id; ``labels`` copy ``input_ids`` with audio tokens (``<sound>``, bos, eos)
  and pad ids set to -100 and nothing else masked (no assistant-only masking, as the reference).

The chat format itself (template, rendering, ``<sound>`` expansion) lives in :mod:`musicflamingo.chat`.

It reads the folder the reference ``save_pretrained`` writes and writes one the reference can load.

Deliberate differences (tested in ``tests/test_processor_review8.py``): integer arrays are PCM scaled to [-1, 1]
and ``[C, T]``/``[T, C]`` arrays are averaged to mono (the reference casts integers as they are and fails on 2-D
arrays); an audio too short for one token or with NaN/inf samples is refused (the reference gives NaN features)
and a <= 20-ms tail past a window is cut (see :meth:`MusicFlamingoProcessor.prepare_audio`); a conversation may
hold several audios (one per message); ``apply_chat_template`` defaults to ``tokenize=True, return_dict=True, add_generation_prompt=True`` and ``decode``
to ``skip_special_tokens=True`` (all ``False`` in the reference); a batch may mix conversations with and without
audio (the reference wants one audio per conversation). ``transformers`` keywords are taken with the values that
give the reference's ids here and refused by name otherwise (:data:`REFERENCE_KWARGS`); ``padding=True`` keeps
``input_features`` whole windows where the reference pads them to the batch's longest window (features its own
encoder cannot take). A message with ``content=None`` is skipped as the template says, where the processor of
``transformers`` 5.25 renders an empty turn (:func:`musicflamingo.chat.render_chat`). Tested in
``tests/test_processor_review17.py``. Chat special tokens typed in a text item are refused; in string content they
are the control tokens, as in the reference, and refused with ``sanitize_control_tokens=True`` (the reference then
tokenizes them as plain text; ``tests/test_processor_review20.py``).

Errors about a conversation start with the place, as :func:`musicflamingo.chat.message_place` spells it:
``conversation 1 message 0 content item 2 (text) must be a string, got int`` (no ``conversation`` for one).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from musicflamingo import chat
from musicflamingo.audio import features as F
from musicflamingo.audio.io import AudioError, load_or_validate
from musicflamingo.chat import DEFAULT_SYSTEM_PROMPT, IGNORE_INDEX, Conversation
from musicflamingo.checkpoint import PROCESSOR_FILES, refuse_interrupted_save, save_files
from musicflamingo.tokenizer import (
    BatchEncoding,
    Tokenizer,
    TokenizerError,
    load_tokenizer,
    read_json_object,
)

logger = logging.getLogger(__name__)

AudioInput = str | os.PathLike | np.ndarray | torch.Tensor

# Keys apply_chat_template's processor_kwargs may hold (the __call__ options), as transformers' processor_kwargs.
PROCESSOR_KWARGS = ("output_labels", "padding_side", "sampling_rate", "return_tensors")

# transformers' processor keywords this processor takes only with the values that give the reference's text outputs
# here: {keyword: (accepted values, what to do instead)}. Each is tested against the reference processor.
REFERENCE_KWARGS = {
    # Rows are always padded to the longest. (transformers' padding=True also pads input_features to the batch's
    # longest window instead of whole windows: features its own encoder refuses; ours stay whole windows.)
    "padding": (
        (True, "longest"),
        "rows of a batch are always padded to the longest row (padding=True); pad the tensors yourself for another "
        "length, or drop padding=",
    ),
    "truncation": (
        (False, None),
        "nothing but audio past max_audio_len is cut here (a cut prompt would lose <sound> tokens); shorten the "
        "text yourself, or drop truncation=",
    ),
    "max_length": ((None,), "rows are never padded or cut to a fixed length; drop max_length="),
    "pad_to_multiple_of": ((None,), "rows are padded to the longest row only; drop pad_to_multiple_of="),
    "return_attention_mask": ((True,), "attention_mask is always returned (left-padded rows need it)"),
    # Our tokenizer encodes without BOS/EOS: the chat template writes every special token (the reference adds none
    # for Qwen2's tokenizer either). True is taken too where the tokenizer adds nothing with it (Qwen2's, ours):
    # see reference_kwargs' adds_nothing.
    "add_special_tokens": (
        (False,),
        "no BOS/EOS is ever added: the chat template writes every special token, and this tokenizer would add some "
        "with add_special_tokens=True; drop add_special_tokens=",
    ),
}
# Keys of transformers' nested keyword dicts (audio_kwargs: the feature extractor's) that are honoured.
_AUDIO_KWARGS = ("sampling_rate", "return_tensors", "return_attention_mask")


def reference_kwargs(
    kwargs: dict, chunk_length: float = 30.0, given: dict | None = None, adds_nothing: bool = False
) -> tuple[dict, list[str], list[str]]:
    """Sort transformers' processor keywords (``padding=True``, ``text_kwargs={...}``, ...) passed to this processor.

    Returns ``(options, unknown, refused)``: the options of :meth:`MusicFlamingoProcessor.__call__` found (also in
    ``text_kwargs``/``common_kwargs``/``audio_kwargs`` dicts: ``padding_side``, ``sampling_rate``,
    ``return_tensors``, ``output_labels``), the keywords this processor lacks, and one message per keyword or value
    refused because its output would differ from the reference's (see :data:`REFERENCE_KWARGS`). ``given``: the
    options passed as arguments (not None); one also in a dict with another value is refused, as transformers
    refuses it ("passed two times"; was resolved silently to the dict's). ``adds_nothing``: the tokenizer adds no
    token with ``add_special_tokens=True`` (see :meth:`MusicFlamingoProcessor.adds_no_special_tokens`), so that
    value gives the reference's ids and is taken too."""
    nested = ("text_kwargs", "common_kwargs", "audio_kwargs")
    # top-level keywords first, so a dict's other value is refused whichever order they were written in
    flat: dict = {**(given or {}), **{k: v for k, v in kwargs.items() if k not in nested}}
    unknown: list[str] = []
    refused: list[str] = []
    for key, value in kwargs.items():
        if key not in nested or value is None:
            continue
        if not isinstance(value, dict):
            refused.append(f"{key} must be a dict of keyword arguments, got {type(value).__name__}")
            continue
        for k, v in value.items():
            if key == "audio_kwargs" and k not in _AUDIO_KWARGS:
                refused.append(
                    f"{key}[{k!r}]={v!r} is not supported: input_features are always whole {chunk_length:g}-s "
                    f"windows of log-mel (the encoder's input); only {list(_AUDIO_KWARGS)} are taken there"
                )
            elif k in flat and flat[k] != v:
                refused.append(
                    f"{k} is given twice with different values ({k}={flat[k]!r}, and {v!r} in {key}): give it once"
                )
            else:
                flat[k] = v
    for k in given or {}:
        flat.pop(k)
    options = {k: flat.pop(k) for k in PROCESSOR_KWARGS if k in flat}
    for key, value in flat.items():
        if key not in REFERENCE_KWARGS:
            unknown.append(key)
            continue
        accepted, hint = REFERENCE_KWARGS[key]
        if key == "add_special_tokens" and adds_nothing:
            accepted = (*accepted, True)
        # `is` for True/False/None (so padding=1 is not padding=True), equality for strings
        if not any(value is a if not isinstance(a, str) else value == a for a in accepted):
            ok = " or ".join(repr(a) for a in accepted)
            refused.append(f"{key}={value!r} is not supported ({ok} only): {hint}")
    return options, unknown, refused


def unknown_keywords_error(unknown: list[str], where: str = "MusicFlamingoProcessor") -> TypeError:
    """The TypeError for keywords neither this processor nor :data:`REFERENCE_KWARGS` knows, naming them."""
    return TypeError(
        f"{where} got unexpected keyword argument(s) {unknown}: it takes {list(PROCESSOR_KWARGS)}, and of "
        f"transformers' processor keywords {list(REFERENCE_KWARGS)} with the values that change nothing here"
    )


# The processor's tensors by name: transformers' BatchFeature (a dict with `.to` and attribute access).
ProcessorOutput = BatchEncoding


class MusicFlamingoProcessor:
    """Text + audio -> model inputs, matching ``transformers.MusicFlamingoProcessor``.

    Args:
        tokenizer: a :class:`~musicflamingo.tokenizer.Tokenizer` holding the audio and chat special tokens.
        chunk_length: window length in seconds (30 for the released model; shorter for from-scratch presets).
        max_audio_len: seconds kept per audio (1200 -> at most 40 windows of 30 s).
        sampling_rate, feature_size, n_fft, hop_length: log-mel front end settings (16 kHz, 128 mel bins, 400-sample
            FFT, 160-sample hop; ``from_pretrained`` takes them from the folder's feature extractor settings).
        audio_token, audio_bos_token, audio_eos_token: placeholder and boundary tokens.
        default_system_prompt: system turn emitted when a conversation does not start with one.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        chunk_length: float = 30.0,
        max_audio_len: float = 1200,
        sampling_rate: int = 16000,
        feature_size: int = 128,
        audio_token: str = chat.AUDIO_PLACEHOLDER,
        audio_bos_token: str = chat.AUDIO_BOS,
        audio_eos_token: str = chat.AUDIO_EOS,
        default_system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        n_fft: int = F.N_FFT,
        hop_length: int = F.HOP_LENGTH,
    ) -> None:
        if max_audio_len < chunk_length:
            raise ValueError(f"max_audio_len={max_audio_len} s must be >= chunk_length={chunk_length} s")
        self.tokenizer = tokenizer
        self.feature_extractor = F.LogMelExtractor(
            feature_size, sampling_rate, chunk_length, n_fft, hop_length
        )
        self.chunk_length = chunk_length
        self.max_audio_len = max_audio_len
        self.sampling_rate = sampling_rate
        self.feature_size = feature_size
        self.audio_token, self.audio_bos_token, self.audio_eos_token = (
            audio_token,
            audio_bos_token,
            audio_eos_token,
        )
        self.default_system_prompt = default_system_prompt
        self.audio_token_id = tokenizer.require_id(audio_token)
        self.audio_bos_token_id = tokenizer.require_id(audio_bos_token)
        self.audio_eos_token_id = tokenizer.require_id(audio_eos_token)

    # The output keys a model forward takes, as transformers' ``model_input_names`` (data collators read it).
    model_input_names = ["input_features", "input_ids", "attention_mask", "input_features_mask"]

    @property
    def chat_template(self) -> str:
        """The Jinja chat template this processor renders (transformers' attribute; ``chat_template.jinja``)."""
        return chat.build_chat_template(self.default_system_prompt)

    # ---------------------------------------------------------------- ids
    @property
    def pad_token_id(self) -> int | None:
        return self.tokenizer.pad_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def audio_token_ids(self) -> list[int]:
        return [self.audio_token_id, self.audio_bos_token_id, self.audio_eos_token_id]

    def adds_no_special_tokens(self) -> bool:
        """Whether the tokenizer adds nothing with ``add_special_tokens=True`` (Qwen2's and our SentencePiece
        models add no BOS/EOS), i.e. that keyword gives the same ids as without it."""
        tok = self.tokenizer
        return tok.encode("x", add_special_tokens=True) == tok.encode("x")

    def check_vocab(self, vocab_size: int, model: str = "the model") -> None:
        """TokenizerError unless every id of the tokenizer fits a model vocabulary of ``vocab_size`` (a larger id
        would index past the embedding table: an IndexError mid-forward). ``model`` names where the size is from.
        Every id: ``len(tokenizer)``, added tokens included (``tokenizer.vocab_size`` leaves them out)."""
        n = len(self.tokenizer)
        if n > vocab_size:
            raise TokenizerError(
                f"the tokenizer has {n} ids but {model} has a vocabulary of {vocab_size}: ids {vocab_size}-{n - 1} "
                "would index past its embeddings (pair the model with the tokenizer it was trained with)"
            )

    # ---------------------------------------------------------------- audio helpers
    @property
    def kept_seconds(self) -> float:
        """Seconds of an audio the windows keep: ``max_audio_len // chunk_length`` whole windows (20 min)."""
        return int(self.max_audio_len // self.chunk_length) * self.chunk_length

    @property
    def _windowing(self) -> tuple[float, float, int, int]:
        """``(chunk_length, max_audio_len, sampling_rate, hop_length)``: the settings of the ``features`` helpers."""
        return self.chunk_length, self.max_audio_len, self.sampling_rate, self.feature_extractor.hop_length

    def audio_token_count(self, num_samples: int) -> int:
        """``<sound>`` tokens for an audio of ``num_samples`` samples (after truncation to ``max_audio_len``)."""
        return F.audio_token_count(num_samples, *self._windowing)

    def usable_samples(self, num_samples: int) -> int:
        """``num_samples`` without a trailing window of 0 audio tokens (``features.usable_samples``)."""
        return F.usable_samples(num_samples, *self._windowing)

    def split_windows(self, audio: np.ndarray | torch.Tensor, source: str | None = None) -> list:
        """``[T]`` waveform -> list of ``chunk_length`` windows; truncation logs one warning naming ``source``."""
        return F.split_windows(audio, self.chunk_length, self.max_audio_len, self.sampling_rate, source)

    def extract_features(
        self, windows: Sequence[np.ndarray | torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows -> (``[W, feature_size, F]`` float32 features, ``[W, F]`` int32 frame mask)."""
        return self.feature_extractor(windows)

    def prepare_audio(
        self, audios: Sequence[AudioInput], sources: Sequence[str] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Load/validate audios, window them and extract features in one batch.

        Returns ``features [W, feature_size, F]``, ``mask [W, F]`` and the ``<sound>`` count of each audio.
        """
        windows, counts = [], []
        for i, a in enumerate(audios):
            # A file is cut to the kept windows before it is decoded; an array is cut by split_windows. An array's
            # errors name its source ("conversation[1] message 0 audio"), not its place among the batch's audios.
            label = f"audio[{i}]" if sources is None else sources[i]
            wave, name = load_or_validate(a, self.sampling_rate, name=label, max_seconds=self.kept_seconds)
            if sources is not None:
                name = sources[i]
            # A <= 20-ms tail past a whole window would be a window of 0 tokens, which the model's RoTE cannot
            # place (IndexError; a GTZAN clip has one): cut it, as training does. The token count is unchanged.
            wave = wave[: self.usable_samples(wave.shape[0])]
            chunks = self.split_windows(wave, source=name)
            windows += chunks
            frames = sum(F.num_frames(c.shape[0], self.feature_extractor.hop_length) for c in chunks)
            if F.tokens_from_frames(frames) < 1:  # the model would fail later with an IndexError in RoTE
                raise AudioError(
                    f"{name}: audio has {wave.shape[0]} samples ({frames} mel frames), too short for one audio "
                    f"token (needs more than {2 * self.feature_extractor.hop_length} samples)"
                )
            counts.append(F.tokens_from_frames(frames))
        feats, mask = self.extract_features(windows)
        return feats, mask, counts

    # ---------------------------------------------------------------- chat template
    def render_chat(
        self,
        conversation: Conversation,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> str:
        """Render one conversation with this processor's system prompt (:func:`musicflamingo.chat.render_chat`)."""
        return chat.render_chat(
            conversation,
            self.default_system_prompt,
            add_generation_prompt,
            self.audio_token,
            continue_final_message=continue_final_message,
        )

    def chat_encoder(self, train_on_prompt: bool = False) -> chat.ChatEncoder:
        """A :class:`~musicflamingo.chat.ChatEncoder` (ids + assistant-only labels) for this tokenizer and prompt."""
        return chat.ChatEncoder(
            self.tokenizer,
            self.audio_token_ids,
            pad_token_id=self.pad_token_id,
            system_prompt=self.default_system_prompt,
            audio_token=self.audio_token,
            train_on_prompt=train_on_prompt,
        )

    @staticmethod
    def conversation_audios(conversation: Conversation, name: str | None = None) -> list[AudioInput]:
        """Audio items of a conversation in order (key ``audio``, else ``url``, else ``path``, as the reference).
        ``name`` (``"conversation 2"`` of a batch) starts the errors, as in :func:`musicflamingo.chat.render_chat`."""
        return [value for value, _ in _audio_items(conversation, name)]

    def apply_chat_template(
        self,
        conversation: Conversation | Sequence[Conversation],
        tokenize: bool = True,
        add_generation_prompt: bool = True,
        return_dict: bool = True,
        output_labels: bool | None = None,
        padding_side: str | None = None,
        continue_final_message: bool = False,
        processor_kwargs: dict | None = None,
        return_tensors: str | None = "pt",
        sampling_rate: int | None = None,
        chat_template: str | None = None,
        sanitize_control_tokens: bool = False,
        tools: list | None = None,
        documents: list | None = None,
        return_assistant_tokens_mask: bool = False,
        load_audio_from_video: bool = False,
        **kwargs,
    ):
        """Render (and by default tokenize) one conversation or a batch of them (``conversation``, transformers'
        name, a list of messages or a list of such lists).

        Content items: ``{"type": "text", "text": ...}`` and ``{"type": "audio", "path": ...}`` or
        ``{"type": "audio", "audio": array_or_tensor}`` (16 kHz mono). Returns the rendered string(s) when
        ``tokenize=False``, else the :meth:`__call__` output (or only ``input_ids`` when ``return_dict=False``).

        Unlike ``transformers``' (all ``False`` there), ``tokenize``, ``return_dict`` and ``add_generation_prompt``
        default to ``True``: pass them explicitly in code that must behave the same with both. The reference's
        ``processor_kwargs`` dict (``output_labels``, ``padding_side``, ``sampling_rate``, ``return_tensors``) is
        accepted and overrides the arguments of the same names.

        The reference's other keywords are taken where they give its output here, and refused naming the keyword
        otherwise (an ``unexpected keyword`` TypeError for those it lacks): ``return_tensors="auto"`` (``"pt"``);
        ``chat_template`` shaped as the Music Flamingo template (its system prompt is used); ``tools``/``documents``
        empty (the template has no place for them: transformers drops them silently); ``sanitize_control_tokens``
        (typed chat special tokens in text items are always refused here; in string content, emitted as is by the
        template, they are the control tokens as in the reference, and refused with ``True``, where the reference
        tokenizes them as plain text);
        ``return_assistant_tokens_mask``/``load_audio_from_video`` ``False`` (assistant-only labels:
        :meth:`chat_encoder`); and :meth:`__call__`'s (``padding=True``, ``text_kwargs``, ...), top level or in
        ``processor_kwargs``. An option given both as an argument and in ``text_kwargs``/``common_kwargs`` with
        another value is refused, as the reference refuses it. With ``tokenize=False`` nothing is tokenized, so, as
        in the reference, the tokenization keywords are not checked (unknown names still are: a misspelt
        ``add_generation_prompt`` would change the text).
        """
        if return_tensors == "auto":  # the reference's default: the processor's own, torch tensors
            return_tensors = "pt"
        opts = {"return_tensors": return_tensors}
        # None: not given (the __call__ defaults apply), so a text_kwargs value is not a contradiction
        for key, value in (
            ("output_labels", output_labels),
            ("padding_side", padding_side),
            ("sampling_rate", sampling_rate),
        ):
            if value is not None:
                opts[key] = value
        template_options = {
            "tools": (
                tools,
                not tools,
                "the Music Flamingo chat template has no tools section (transformers "
                "drops them without a word); describe them in a system or user message",
            ),
            "documents": (
                documents,
                not documents,
                "the Music Flamingo chat template has no documents section "
                "(transformers drops them without a word); put their text in a message",
            ),
            "return_assistant_tokens_mask": (
                return_assistant_tokens_mask,
                return_assistant_tokens_mask is False,
                "the template marks no generation spans (transformers returns all zeros); for assistant-only "
                "labels use processor.chat_encoder().encode(messages, audio_token_counts)",
            ),
            "load_audio_from_video": (
                load_audio_from_video,
                load_audio_from_video is False,
                "video is not read; give the audio track as a file or array",
            ),
            "sanitize_control_tokens": (
                sanitize_control_tokens,
                isinstance(sanitize_control_tokens, bool),
                "it must be True or False",
            ),
        }
        for key, (value, ok, hint) in template_options.items():
            # as the reference, options of the tokenized output are not looked at when nothing is tokenized
            tokens_only = key in ("return_assistant_tokens_mask", "load_audio_from_video")
            if not ok and (tokenize or not tokens_only):
                raise ValueError(f"{key}={value!r} is not supported: {hint}")
        if sanitize_control_tokens and not tokenize:  # as the reference
            raise ValueError("sanitize_control_tokens=True requires tokenize=True")
        prompt = self.default_system_prompt
        if chat_template is not None:
            prompt = chat.template_system_prompt(chat_template) if isinstance(chat_template, str) else None
            if prompt is None:
                raise ValueError(
                    f"chat_template={chat_template!r:.80}: only the Music Flamingo template is rendered here (with "
                    "any system prompt, see musicflamingo.chat.build_chat_template); put another system prompt in a "
                    "system message, or drop chat_template="
                )
        adds_nothing = bool(processor_kwargs or kwargs) and self.adds_no_special_tokens()
        if processor_kwargs and tokenize:  # the reference ignores them with tokenize=False
            bad = [k for k in processor_kwargs if k in ("text", "audio", "sources")]
            whys = [f"{k!r} comes from the conversations" for k in bad]
            for k, v in processor_kwargs.items():
                _, unknown, refused = reference_kwargs({k: v}, self.chunk_length, adds_nothing=adds_nothing)
                if k not in bad and (unknown or refused):
                    bad.append(k)
                    whys += refused or [f"{k!r} is not a keyword of this processor"]
            if bad:
                raise ValueError(
                    f"processor_kwargs {bad} are not supported: {'; '.join(whys)} (this processor takes "
                    f"{list(PROCESSOR_KWARGS)}, and transformers' {list(REFERENCE_KWARGS)} with the values that "
                    "change nothing here)"
                )
            opts.update(processor_kwargs)
        if kwargs:  # the reference passes them to the processor call as processor_kwargs
            _, unknown, refused = reference_kwargs(kwargs, self.chunk_length, adds_nothing=adds_nothing)
            if unknown:
                raise unknown_keywords_error(unknown, "MusicFlamingoProcessor.apply_chat_template")
            if refused and tokenize:
                raise ValueError("; ".join(refused))
            opts.update(kwargs)
        batched = isinstance(conversation, (list, tuple)) and len(conversation) > 0
        batched = batched and isinstance(conversation[0], (list, tuple))
        convs = list(conversation) if batched else [conversation]
        # Every error names its place as chat.message_place spells it: "conversation 2 message 0 content item 1
        # (text) must be ..." (a lone conversation: from "message 0" on).
        names = [f"conversation {b}" if batched else None for b in range(len(convs))]
        texts = [
            chat.render_chat(
                c,
                prompt,
                add_generation_prompt,
                self.audio_token,
                continue_final_message=continue_final_message,
                name=name,
            )
            for c, name in zip(convs, names)
        ]
        if not tokenize:
            return texts if batched else texts[0]
        audios, sources = [], []
        for c, name in zip(convs, names):
            for i, m in enumerate(c):  # render_chat checked that each message is a dict
                content = m["content"] if isinstance(m["content"], (list, tuple)) else ()
                n = sum(isinstance(x, dict) and chat.is_audio_item(x) for x in content)
                where = chat.message_place(name, i)
                if isinstance(m["content"], str):
                    self._check_typed_content(m["content"], f"{where} content", sanitize_control_tokens)
                if n > 1:  # the <sound> count check below blamed the text: "1 placeholder but 2 audios"
                    raise ValueError(
                        f"{where} has {n} audio items, but the chat template renders 1 {self.audio_token!r} "
                        f"placeholder per message, as the reference's does, and each takes one audio ({n} audio(s) "
                        "here): put each audio in a message of its own"
                    )
            for a, place in _audio_items(c, name):
                audios.append(a)
                # an array is named by its place ("conversation 1 message 2 content item 0 (audio)"), a file by name
                sources.append(Path(a).name if isinstance(a, (str, os.PathLike)) else place)
        out = self(texts, audio=audios or None, sources=sources, **opts)
        return out if return_dict else out["input_ids"]

    def _check_typed_content(self, text: str, where: str, sanitize_control_tokens: bool) -> None:
        """ValueError naming ``where`` when a message's string content cannot be tokenized as the reference does.

        String content is emitted as is, as the template does, so a typed ``<|im_end|>`` is the control token in
        both processors (item texts are refused by :func:`musicflamingo.chat.render_chat`). Refused: a typed
        ``<sound>`` (only audio items give audios), any chat special token with ``sanitize_control_tokens=True``
        (the reference then reads it as plain text, ids the model never saw; ours gave the control token without
        a word) and a lone surrogate (the reference's tokenizer fails with a bare TypeError)."""
        if self.audio_token in text:
            # Only audio items give audios, so a typed placeholder is always one too many; the count check of
            # __call__ named neither the message nor the cause ("1 placeholder(s) but 0 audio(s)").
            raise ValueError(
                f"{where} holds the audio placeholder {self.audio_token!r} as typed text (position "
                f"{text.index(self.audio_token)}), but audios come only from "
                '{"type": "audio", ...} content items (the template writes their placeholder): give the '
                f"audio as an item, or remove {self.audio_token!r} from the text"
            )
        chat.check_typed_text(text, where, chat.FORBIDDEN_TOKENS if sanitize_control_tokens else ())

    # ---------------------------------------------------------------- main entry
    def __call__(
        self,
        text: str | Sequence[str],
        audio: AudioInput | Sequence[AudioInput] | None = None,
        output_labels: bool | None = None,
        padding_side: str | None = None,
        sources: Sequence[str] | None = None,
        sampling_rate: int | None = None,
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> ProcessorOutput:
        """Tokenize ``text`` (one string or a batch) and featurize ``audio`` (the i-th audio fills the i-th
        ``<sound>`` across the batch).

        Returns:
            ``input_ids`` / ``attention_mask`` int64 ``[B, S]`` (padded on ``padding_side``), and when audio is given
            ``input_features`` float32 ``[W, feature_size, F]`` and ``input_features_mask`` int32 ``[W, F]``;
            ``labels`` int64 ``[B, S]`` when ``output_labels``.

        ``sources`` (optional, one per audio) names the audios in warnings, e.g. the truncation warning.
        ``sampling_rate`` (optional) states the rate of array audio: any other than the processor's is refused, as
        the reference refuses it (arrays are not resampled; files are). ``return_tensors`` can only be ``"pt"``.

        transformers' keywords are taken with the values that give its output here (``padding=True`` or
        ``"longest"``, ``truncation=False``, ``return_attention_mask=True``, ``add_special_tokens=False``, or True
        where the tokenizer adds nothing with it, as Qwen2's, and these options inside ``text_kwargs``/
        ``common_kwargs``/``audio_kwargs`` dicts); other values and unknown keywords are refused by name. With ``padding=True`` transformers also pads ``input_features`` to the longest window
        of the batch, which its own encoder cannot take (it adds 1500 positions); ours stay whole windows. An option
        given as an argument and in one of those dicts with another value is refused (transformers: "passed two
        times"). ``output_labels`` defaults to ``False``, ``padding_side`` to ``"left"``.
        """
        if kwargs:
            given = {
                "output_labels": output_labels,
                "padding_side": padding_side,
                "sampling_rate": sampling_rate,
            }
            given = {k: v for k, v in given.items() if v is not None}
            options, unknown, refused = reference_kwargs(
                kwargs, self.chunk_length, given, adds_nothing=self.adds_no_special_tokens()
            )
            if unknown:
                raise unknown_keywords_error(unknown)
            if refused:
                raise ValueError("; ".join(refused))
            output_labels = options.get("output_labels", output_labels)
            padding_side = options.get("padding_side", padding_side)
            sampling_rate = options.get("sampling_rate", sampling_rate)
            return_tensors = options.get("return_tensors", return_tensors)
        output_labels = bool(output_labels)
        padding_side = "left" if padding_side is None else padding_side
        if not isinstance(text, (str, list, tuple)):  # None was a bare TypeError ('NoneType' is not iterable)
            raise ValueError(
                f"text must be a string or a non-empty list of strings, got {type(text).__name__}"
            )
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("text must be a string or a non-empty list of strings")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if return_tensors != "pt":
            raise ValueError(
                f"return_tensors={return_tensors!r}: this processor only returns torch tensors ('pt')"
            )
        if audio is None:
            audios = []
        elif isinstance(audio, (str, os.PathLike, np.ndarray, torch.Tensor)):
            audios = [audio]
        elif isinstance(audio, dict):  # a `datasets` Audio sample: its keys were counted as audios
            raise ValueError(
                f"audio is a dict (keys {sorted(map(str, audio))[:5]}), not a waveform: pass the waveform itself as a "
                f"numpy array or torch tensor at {self.sampling_rate} Hz (a `datasets` sample's audio['array'] "
                "after resampling it from audio['sampling_rate']), or a file path"
            )
        else:
            try:
                audios = list(audio)
            except TypeError:  # e.g. a decoder object or a number: a bare "object is not iterable"
                raise ValueError(
                    f"audio must be a file path, a numpy array or torch tensor, or a list of them; got "
                    f"{type(audio).__name__}"
                ) from None
            # np.float32 too: list(wave) of a float32 array gives numpy scalars, which are not Python floats
            if audios and all(
                isinstance(a, (int, float, np.number)) and not isinstance(a, bool) for a in audios
            ):
                # a waveform as a list of numbers: each sample was counted as an audio
                raise ValueError(
                    f"audio is a list of {len(audios)} numbers: pass one waveform as a numpy array or torch tensor "
                    "(a list holds one item per audio)"
                )
        per_text = [t.count(self.audio_token) for t in texts]
        if sum(per_text) != len(audios):
            stacked = ""
            if (
                isinstance(audio, (np.ndarray, torch.Tensor)) and audio.ndim > 1
            ):  # np.stack(waves): one stereo audio
                stacked = (
                    f" (an array of shape {tuple(audio.shape)} is one audio, its channels averaged to mono: pass "
                    "several audios as a list of 1-D arrays)"
                )
            raise ValueError(
                f"the text has {sum(per_text)} {self.audio_token!r} placeholder(s) (per sample: {per_text}) but "
                f"{len(audios)} audio(s) were given{stacked}; each {self.audio_token!r} takes one audio, in order"
            )
        if sources is not None and len(sources) != len(audios):
            raise ValueError(
                f"sources names {len(sources)} audio(s) but {len(audios)} were given: one name per audio"
            )
        if audios and sampling_rate is not None and sampling_rate != self.sampling_rate:
            if all(
                isinstance(a, (str, os.PathLike)) for a in audios
            ):  # the advice below was to pass file paths
                raise ValueError(
                    f"sampling_rate={sampling_rate}: the audios are files, which are resampled to "
                    f"{self.sampling_rate} Hz on load whatever their rate; drop sampling_rate= (it states the rate "
                    "of array audio), as the reference refuses it too"
                )
            raise ValueError(
                f"sampling_rate={sampling_rate}: this processor takes {self.sampling_rate} Hz audio; resample the "
                f"arrays first (musicflamingo.audio.io.resample) or pass file paths, which are resampled on load"
            )
        out: dict[str, torch.Tensor] = {}
        counts: list[int] = []
        if audios:
            feats, mask, counts = self.prepare_audio(audios, sources)
            out["input_features"], out["input_features_mask"] = feats, mask
        rows, k = [], 0
        for t, n in zip(texts, per_text):
            rows.append(
                chat.encode_expanded(
                    self.tokenizer, t, counts[k : k + n], self.audio_token_ids, self.audio_token
                )
            )
            k += n
        input_ids, attention_mask = self._pad(rows, padding_side)
        result = ProcessorOutput(input_ids=input_ids, attention_mask=attention_mask, **out)
        if output_labels:
            labels = input_ids.clone()
            labels[torch.isin(input_ids, torch.tensor(self.audio_token_ids))] = IGNORE_INDEX
            if self.pad_token_id is not None:
                labels[input_ids == self.pad_token_id] = IGNORE_INDEX
            result["labels"] = labels
        return result

    def _pad(self, rows: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
        length = max(len(r) for r in rows)
        pad = self.pad_token_id
        if pad is None and any(len(r) != length for r in rows):
            raise ValueError("the tokenizer has no pad token, so rows of different lengths cannot be batched")
        ids = torch.full((len(rows), length), pad if pad is not None else 0, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            sl = slice(length - len(r), length) if side == "left" else slice(0, len(r))
            ids[i, sl] = torch.tensor(r, dtype=torch.long)
            mask[i, sl] = 1
        return ids, mask

    # ---------------------------------------------------------------- decoding
    def decode(
        self,
        ids: int | Sequence[int] | Sequence[Sequence[int]] | torch.Tensor | np.ndarray,
        skip_special_tokens: bool = True,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> str | list[str]:
        """Text of ``ids`` (the tokenizer's :meth:`~musicflamingo.tokenizer.Tokenizer.decode`). As the reference's
        ``decode``: one id (an int or a 0-d tensor) is a sequence of one, and a batch (``[B, S]``, e.g.
        ``generate``'s output) gives one string per row. ``clean_up_tokenization_spaces``: ``None``/``False`` only
        (:func:`~musicflamingo.tokenizer.check_clean_up`)."""
        return self.tokenizer.decode(ids, skip_special_tokens, clean_up_tokenization_spaces)

    def batch_decode(
        self,
        ids: Sequence[Sequence[int]] | torch.Tensor,
        skip_special_tokens: bool = True,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> list[str]:
        """One string per row of ``ids`` (``clean_up_tokenization_spaces`` as in :meth:`decode`)."""
        return self.tokenizer.batch_decode(ids, skip_special_tokens, clean_up_tokenization_spaces)

    # ---------------------------------------------------------------- disk
    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> MusicFlamingoProcessor:
        """Load from a folder written by this class or by the reference ``MusicFlamingoProcessor.save_pretrained``."""
        d = Path(directory)
        if d.is_file():  # a file's path said "not found"
            raise NotADirectoryError(
                f"{d}: a file, where the processor's folder (processor_config.json, tokenizer files) is expected"
            )
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: processor directory not found")
        refuse_interrupted_save(d)
        cfg = _read_json(d / "processor_config.json")
        source = d / "processor_config.json"
        fe = cfg.get("feature_extractor")
        if not fe:
            source = d / "preprocessor_config.json"
            fe = _read_json(source)
        try:
            extractor = F.LogMelExtractor.from_dict(fe)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
        max_len = cfg.get("max_audio_len", F.MAX_AUDIO_LEN)
        number = isinstance(max_len, (int, float)) and not isinstance(max_len, bool)
        if not number or not extractor.chunk_length <= max_len < float("inf"):
            raise ValueError(
                f"{d / 'processor_config.json'}: max_audio_len={max_len!r} must be a number of seconds >= "
                f"chunk_length={extractor.chunk_length}"
            )
        template = _read_template(d, cfg)
        prompt = DEFAULT_SYSTEM_PROMPT
        if template is not None:
            found = chat.template_system_prompt(template)
            if found is None:
                logger.warning(
                    "%s: chat template differs from the Music Flamingo template; using the built-in one", d
                )
            else:
                prompt = found
        processor = cls(
            load_tokenizer(d),
            chunk_length=extractor.chunk_length,
            max_audio_len=max_len,
            sampling_rate=extractor.sampling_rate,
            feature_size=extractor.feature_size,
            audio_token=cfg.get("audio_token", chat.AUDIO_PLACEHOLDER),
            audio_bos_token=cfg.get("audio_bos_token", chat.AUDIO_BOS),
            audio_eos_token=cfg.get("audio_eos_token", chat.AUDIO_EOS),
            default_system_prompt=prompt,
            n_fft=extractor.n_fft,
            hop_length=extractor.hop_length,
        )
        vocab = _config_vocab_size(d / "config.json")
        if vocab is not None:  # a checkpoint folder: its tokenizer must fit its model
            processor.check_vocab(vocab, f"{d / 'config.json'}")
        return processor

    def save_pretrained(self, directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write tokenizer files, ``processor_config.json``, ``preprocessor_config.json`` and ``chat_template.jinja``
        (the reference ``MusicFlamingoProcessor.from_pretrained`` loads them when the tokenizer is ``tokenizer.json``).

        As the model's save (``checkpoint.save_files``): all or nothing, only these files (and those of the other
        tokenizer kind, which would shadow them) are replaced, anything else in the folder stays; a file, another
        model's folder or a non-empty folder without our files is refused unless ``overwrite``."""
        fe = self.feature_extractor.to_dict()
        max_len = int(self.max_audio_len) if float(self.max_audio_len).is_integer() else self.max_audio_len
        cfg = {
            "audio_bos_token": self.audio_bos_token,
            "audio_eos_token": self.audio_eos_token,
            "audio_token": self.audio_token,
            "feature_extractor": fe,
            "max_audio_len": max_len,
            "processor_class": "MusicFlamingoProcessor",
        }

        def write(d: Path) -> None:
            self.tokenizer.save(d)
            (d / "processor_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
            (d / "preprocessor_config.json").write_text(
                json.dumps({**fe, "processor_class": "MusicFlamingoProcessor"}, indent=2) + "\n",
                encoding="utf-8",
            )
            (d / "chat_template.jinja").write_text(
                chat.build_chat_template(self.default_system_prompt), encoding="utf-8"
            )

        return save_files(directory, write, PROCESSOR_FILES.__contains__, overwrite, "processor")


def _audio_items(conversation: Conversation, name: str | None) -> list[tuple[AudioInput, str]]:
    """``(audio, place)`` of each audio item of a conversation, in order: the value of its key ``audio``, else
    ``url``, else ``path`` (as the reference), and where it is (``chat.message_place``, the key as the field).
    ``name`` (``"conversation 2"``) starts the places."""
    found = []
    for i, m in enumerate(conversation):
        if not isinstance(m.get("content"), (list, tuple)):
            continue
        for j, c in enumerate(m["content"]):
            if not (isinstance(c, dict) and chat.is_audio_item(c)):
                continue
            key = next((k for k in ("audio", "url", "path") if c.get(k) is not None), None)
            if key is None:
                raise ValueError(
                    f"{chat.message_place(name, i, j)} is audio but has no 'audio', 'url' or 'path': expected a "
                    "waveform array or a file path in one of them"
                )
            value, place = c[key], chat.message_place(name, i, j, key)
            if isinstance(value, str) and value.startswith(("http://", "https://")):
                raise AudioError(
                    f"{place}: {value} is a URL, which is not read here (offline); download the file and give its "
                    "path"
                )
            if not isinstance(value, (str, os.PathLike, np.ndarray, torch.Tensor)):
                # was "audio is a list of 1 numbers" (a number) or a count mismatch (a list), from __call__
                what = f"{type(value).__name__} {value!r:.60}"
                if isinstance(value, dict):  # a `datasets` Audio sample
                    what += " (of a `datasets` sample, give audio['array'] resampled to the processor's rate)"
                raise ValueError(
                    f"{place} must be a file path or a waveform as a numpy array or torch tensor, got {what}"
                )
            found.append((value, place))
    return found


def _read_json(path: Path) -> dict:
    return read_json_object(path, ValueError)


def _config_vocab_size(path: Path) -> int | None:
    """``text_config.vocab_size`` of a checkpoint's config.json; None without one (``load_config`` reports a
    malformed one)."""
    try:
        vocab = _read_json(path).get("text_config", {}).get("vocab_size")
    except (ValueError, AttributeError):
        return None
    return vocab if isinstance(vocab, int) and not isinstance(vocab, bool) else None


def _read_template(d: Path, cfg: dict) -> str | None:
    if (d / "chat_template.jinja").is_file():
        try:
            return (d / "chat_template.jinja").read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{d / 'chat_template.jinja'}: not UTF-8 text (byte {e.start}); expected the Jinja chat template"
            ) from None
    legacy = _read_json(d / "chat_template.json").get("chat_template")
    return legacy if legacy is not None else cfg.get("chat_template")
