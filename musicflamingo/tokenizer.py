"""Tokenizers: the Qwen2 byte-level BPE of the released checkpoint, and SentencePiece for from-scratch training.

Both implement :class:`Tokenizer`: ``encode`` recognises special tokens as single ids and adds no BOS; ``decode``
inverts it exactly (byte-level BPE maps ``"Ċ"`` back to ``"\\n"``). :func:`load_tokenizer` picks the class from
the files in a directory:

* ``tokenizer.json`` -> :class:`HFTokenizer` (``tokenizers`` library; pad/eos from ``tokenizer_config.json``, as
  ``transformers`` does; Qwen2's pad is ``<|endoftext|>``).
* ``tokenizer.model`` + ``special_tokens.json`` -> :class:`SentencePieceTokenizer`.

Code written against ``transformers``' tokenizer works on :class:`Tokenizer` where the result is the same (tested
against ``AutoTokenizer`` on the same files in ``tests/test_processor_tok_review17.py`` and ``..._review18.py``):
``tokenizer(texts, padding=True, return_tensors="pt")`` (also ``truncation=True, max_length=n``,
``padding="max_length"``, text pairs), ``encode(text, return_tensors="pt")``, ``tokenize``,
``convert_tokens_to_ids``, ``convert_ids_to_tokens``, ``convert_tokens_to_string``, ``get_vocab``,
``added_tokens_encoder``, ``added_tokens_decoder``, ``add_tokens``, ``add_special_tokens``, ``pad`` (a DataLoader's
``collate_fn``), ``special_tokens_map``, ``all_special_tokens``/``all_special_ids`` (transformers 5's: the named
tokens and ``extra_special_tokens``), ``bos_token_id``, ``unk_token``, ``model_max_length``, ``name_or_path``,
``padding_side``, ``truncation_side``, ``batch_decode``, ``decode`` of one id or a batch. Differences: ``decode``
skips special tokens by default (keeps them in transformers), ``encode`` adds nothing by default
(``add_special_tokens=True`` there; Qwen2's adds nothing either); ``apply_chat_template`` is the processor's. As there, ``vocab_size`` is the base vocabulary (added tokens left out)
and ``len(tokenizer)`` counts every id: size a model's embeddings by ``len(tokenizer)``.

Train a SentencePiece model: ``python -m musicflamingo.tokenizer train --input corpus.txt --vocab-size 2000 --out DIR``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from musicflamingo.chat import END_OF_TEXT, END_OF_TURN, SPECIAL_TOKENS, check_typed_text

logger = logging.getLogger(__name__)

# transformers' model_max_length where tokenizer_config.json sets none, and the bound above which it means no limit
VERY_LARGE_INTEGER = int(1e30)
LARGE_INTEGER = int(1e20)
# transformers' named special tokens, in its order (special_tokens_map, all_special_tokens, add_special_tokens keys)
SPECIAL_TOKENS_ATTRIBUTES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


class TokenizerError(ValueError):
    """A tokenizer directory or file that cannot be used."""


class BatchEncoding(dict):
    """Tensors (or lists) by name (a dict), with ``transformers.BatchEncoding``'s ``.to`` and attribute access, so
    ``tokenizer(...).to(device)`` and ``processor.apply_chat_template(...).to(model.device)`` work as there.

    ``.to(device, dtype)`` moves every tensor and casts only the floating-point ones (``input_features``); ids and
    masks keep their integer dtype. It updates this object in place and returns it, as ``BatchFeature.to``.
    """

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, *args, **kwargs) -> BatchEncoding:
        device = kwargs.get("device")
        if device is None and args and not isinstance(args[0], torch.dtype):
            if not isinstance(args[0], (str, int, torch.device)):
                raise ValueError(
                    f"cannot move the processor output to {args[0]!r}: expected a device or a dtype"
                )
            device = args[0]
        non_blocking = kwargs.get("non_blocking", False)
        for k, v in self.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                self[k] = v.to(*args, **kwargs)
            elif isinstance(v, torch.Tensor) and device is not None:
                self[k] = v.to(device=device, non_blocking=non_blocking)
        return self


def check_clean_up(value) -> None:
    """``clean_up_tokenization_spaces`` of transformers' decode: ``None``/``False`` (the text as decoded, Qwen2's
    setting) are taken; ``True`` is refused: transformers 5.25 ignores it for BPE tokenizers, older versions strip
    the space before punctuation, so its meaning depends on the version."""
    if value is not None and value is not False:
        raise ValueError(
            f"clean_up_tokenization_spaces={value!r} is not supported (None or False only): text is decoded as is "
            "(transformers 5.25 ignores True for BPE tokenizers such as Qwen2's; older versions strip the space "
            "before punctuation); drop it"
        )


def _id_list(ids) -> list:
    """ids as a list: one id (int, numpy integer, 0-d tensor) is a list of one; tensors and arrays become lists."""
    if isinstance(ids, (torch.Tensor, np.ndarray, np.integer)):
        ids = ids.tolist()
    return [ids] if isinstance(ids, int) else list(ids)


class Tokenizer:
    """Interface shared by the tokenizers. Subclasses set ``special_tokens``, ``pad_token`` and ``eos_token``."""

    special_tokens: tuple[str, ...] = ()
    pad_token: str | None = None
    eos_token: str | None = None
    bos_token: str | None = None  # none in Qwen2's and our SentencePiece files
    padding_side: str = "right"  # where __call__ pads (transformers' attribute and default)

    unk_token: str | None = None  # none in Qwen2's files (byte-level BPE needs none)
    # transformers' default where the files set none (no limit); tokenizer_config.json's model_max_length otherwise
    model_max_length: int = VERY_LARGE_INTEGER
    truncation_side: str = "right"  # which end truncation cuts (transformers' attribute and default)
    sep_token: str | None = None  # transformers' other named tokens: none in Qwen2's files
    cls_token: str | None = None
    mask_token: str | None = None
    name_or_path: str = ""  # the folder it was loaded from (load_tokenizer), as transformers' attribute
    # transformers' extra_special_tokens (tokenizer_config.json's list; None: this tokenizer's special tokens) and the
    # model-specific named ones (other "*_token" keys there, e.g. audio_token)
    _extra_special: list[str] | None = None
    _named_extra: dict[str, str] = {}

    def encode(
        self,
        text: str,
        text_pair: str | None = None,
        add_special_tokens: bool = False,
        *,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = None,
    ) -> list[int] | torch.Tensor | np.ndarray:
        """Token ids of ``text``; special tokens in the text become their single ids; no BOS/EOS added unless
        ``add_special_tokens`` and the tokenizer file adds some (Qwen2's and our SentencePiece models add none).

        transformers' ``encode`` keywords give its output: ``text_pair`` (the pair's ids follow the text's, as
        Qwen2's), ``truncation``/``max_length``/``padding`` (see :meth:`__call__`) and ``return_tensors``
        (``"pt"``/``"np"``: a ``[1, S]`` int64 tensor/array)."""
        if isinstance(text_pair, bool):  # encode(text, True): transformers reads a text pair there
            raise ValueError(
                f"encode(text, {text_pair!r}): the second argument is text_pair, as in transformers; pass "
                f"add_special_tokens={text_pair!r} by name"
            )
        if not isinstance(text, str) or not (text_pair is None or isinstance(text_pair, str)):
            # a bare "TextInputSequence must be str" from `tokenizers`; SentencePiece gave a list per string
            what = text if not isinstance(text, str) else text_pair
            raise ValueError(
                f"encode takes one string (and a string text_pair), got {type(what).__name__} {what!r:.60}: for a "
                "batch use tokenizer(texts)['input_ids']; pre-split tokens: convert_tokens_to_ids"
            )
        plain = not padding and truncation is None and max_length is None and return_tensors is None
        if plain:
            return self._encode(text, text_pair, add_special_tokens)
        out = self(
            text,
            text_pair,
            add_special_tokens=add_special_tokens,
            padding=padding,
            truncation=truncation,
            max_length=max_length,
            padding_side=padding_side,
            return_tensors=return_tensors,
            return_attention_mask=False,
        )
        return out["input_ids"]

    def _encode(self, text: str, text_pair: str | None, add_special_tokens: bool) -> list[int]:
        raise NotImplementedError

    @property
    def unk_token_id(self) -> int | None:
        return None if self.unk_token is None else self.token_to_id(self.unk_token)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """transformers' map of the named special tokens that are set (bos, eos, unk, sep, pad, cls, mask, then
        model-specific ones such as an ``audio_token`` key of tokenizer_config.json), in its order."""
        named = {n: getattr(self, n) for n in SPECIAL_TOKENS_ATTRIBUTES if getattr(self, n) is not None}
        return {**named, **self._named_extra}

    @property
    def extra_special_tokens(self) -> list[str]:
        """transformers 5's ``extra_special_tokens``: tokenizer_config.json's list (``additional_special_tokens`` in
        older files); replaced or extended by :meth:`add_special_tokens`, untouched by ``add_tokens``."""
        return list(self.special_tokens) if self._extra_special is None else list(self._extra_special)

    def add_special_tokens(self, special_tokens_dict: dict, replace_extra_special_tokens: bool = True) -> int:
        """transformers' ``add_special_tokens``: sets the named tokens (``{"pad_token": "<pad>"}``) and
        ``extra_special_tokens`` (replaced, or extended with ``replace_extra_special_tokens=False``), adding those
        not in the vocabulary as special tokens (the number added is returned: resize the model's embeddings to
        ``len(tokenizer)``). :meth:`save` writes them where transformers reads them."""
        if not special_tokens_dict:
            return 0
        d = dict(special_tokens_dict)
        if "additional_special_tokens" in d and not d.get("extra_special_tokens"):
            d["extra_special_tokens"] = d.pop("additional_special_tokens")
        allowed = (*SPECIAL_TOKENS_ATTRIBUTES, "extra_special_tokens")
        for key, value in d.items():
            if key not in allowed:
                raise ValueError(
                    f"add_special_tokens: {key!r} is not a special token name; expected one of {allowed}"
                )
            values = value if key == "extra_special_tokens" and isinstance(value, (list, tuple)) else [value]
            if key == "extra_special_tokens" and values is not value or not all(map(_is_token, values)):
                kind = "a list of tokens" if key == "extra_special_tokens" else "a token"
                raise ValueError(f"add_special_tokens: {key}={value!r}: expected {kind} (str or AddedToken)")
        extra = self.extra_special_tokens
        new_extra = [
            t
            for t in d.get("extra_special_tokens", [])
            if replace_extra_special_tokens or _token_text(t) not in extra
        ]
        added = self.add_tokens(
            [v for k, v in d.items() if k != "extra_special_tokens"] + new_extra, special_tokens=True
        )
        for key, value in d.items():
            if key != "extra_special_tokens":
                setattr(self, key, _token_text(value))
        if "extra_special_tokens" in d:
            new_extra = [_token_text(t) for t in new_extra]
            self._extra_special = (
                new_extra if replace_extra_special_tokens and new_extra else extra + new_extra
            )
        return added

    def add_tokens(self, new_tokens, special_tokens: bool = False) -> int:
        """transformers' ``add_tokens``: see :meth:`HFTokenizer.add_tokens`; this tokenizer kind cannot."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot add tokens: train it again with them "
            "(train_sentencepiece(..., special_tokens=[...])), or use a tokenizer.json tokenizer"
        )

    def tokenize(self, text: str) -> list[str]:
        """transformers' ``tokenize``: the tokens of ``text`` (``convert_ids_to_tokens`` of its ids)."""
        return [self.id_to_token(i) for i in self._encode(text, None, False)]

    def decode(
        self, ids, skip_special_tokens: bool = True, clean_up_tokenization_spaces: bool | None = None
    ) -> str | list[str]:
        """Text of ``ids``. As transformers' ``decode``: one id (an int or a 0-d tensor) is a sequence of one, and a
        batch (``[B, S]``, e.g. ``generate``'s output) gives one string per row. ``clean_up_tokenization_spaces``:
        see :func:`check_clean_up`."""
        check_clean_up(clean_up_tokenization_spaces)
        ids = _id_list(ids)
        if ids and (isinstance(ids[0], (list, tuple)) or getattr(ids[0], "ndim", 0) > 0):
            return self.batch_decode(ids, skip_special_tokens)
        return self._decode([int(i) for i in ids], skip_special_tokens)

    def batch_decode(
        self, rows, skip_special_tokens: bool = True, clean_up_tokenization_spaces: bool | None = None
    ) -> list[str]:
        """One string per row of ``rows`` (``[B, S]``, or a list of rows)."""
        check_clean_up(clean_up_tokenization_spaces)
        return [self._decode([int(i) for i in _id_list(r)], skip_special_tokens) for r in _id_list(rows)]

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def id_to_token(self, idx: int) -> str | None:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary, added (special) tokens left out, as transformers' ``vocab_size``; every id
        is below ``len(tokenizer)``, not below this."""
        return len(self)

    def __len__(self) -> int:
        """Total number of ids, special tokens included (transformers' ``len(tokenizer)``)."""
        raise NotImplementedError

    def save(self, directory: str | os.PathLike) -> Path:
        raise NotImplementedError

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """transformers' name for :meth:`save`."""
        return self.save(directory)

    def model_bytes(self) -> bytes:
        """The serialized tokenizer model (vocabulary, merges or pieces: what decides the ids), for fingerprints
        such as a manifest index's. This default: the vocabulary size and the ids of a probe sentence."""
        return json.dumps([len(self), self.encode("Tempo? 96 BPM, in C major.")]).encode()

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self.token_to_id(self.pad_token)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.token_to_id(self.eos_token)

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self.token_to_id(self.bos_token)

    @property
    def all_special_tokens(self) -> list[str]:
        """transformers 5's list: the named ones (:attr:`special_tokens_map`) first, then
        :attr:`extra_special_tokens`. As there, tokens added by ``add_tokens(..., special_tokens=True)`` are not in
        it (decode still skips them)."""
        named = list(self.special_tokens_map.values())
        return list(dict.fromkeys(named + self.extra_special_tokens))

    @property
    def all_special_ids(self) -> list[int | None]:
        return [self.token_to_id(t) for t in self.all_special_tokens]

    @property
    def special_token_ids(self) -> set[int]:
        return {i for t in self.special_tokens if (i := self.token_to_id(t)) is not None}

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | None | list[int | None]:
        """transformers' name: the id of a token (None when it is not one), or a list of them."""
        if isinstance(tokens, str):
            return self.token_to_id(tokens)
        return [self.token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False) -> str | None | list[str | None]:
        """transformers' name: the token of an id (None past the vocabulary), or a list of them;
        ``skip_special_tokens`` leaves out :attr:`all_special_ids`, as there (not tokens added special since)."""
        if isinstance(ids, (int, np.integer)) or (isinstance(ids, torch.Tensor) and ids.ndim == 0):
            return self.id_to_token(int(ids))
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self.id_to_token(i) for i in _id_list(ids) if int(i) not in skip]

    def get_vocab(self) -> dict[str, int]:
        """Every token (special ones included) -> its id, as transformers' ``get_vocab``."""
        raise NotImplementedError

    def convert_tokens_to_string(self, tokens: Sequence[str]) -> str:
        """transformers' ``convert_tokens_to_string``: the text of a list of tokens (e.g. :meth:`tokenize`'s)."""
        if isinstance(tokens, str) or not all(isinstance(t, str) for t in tokens):
            bad = tokens if isinstance(tokens, str) else next(t for t in tokens if not isinstance(t, str))
            raise ValueError(
                f"convert_tokens_to_string takes a list of token strings, got {type(bad).__name__} {bad!r:.60} "
                "(ids: use decode; None comes from convert_ids_to_tokens past the vocabulary)"
            )
        return self._tokens_to_string(list(tokens))

    def _tokens_to_string(self, tokens: list[str]) -> str:
        raise NotImplementedError

    @property
    def added_tokens_decoder(self) -> dict:
        """transformers' ``added_tokens_decoder``: id -> ``tokenizers.AddedToken`` of the special/added tokens."""
        from tokenizers import AddedToken

        return {
            i: AddedToken(t, normalized=False, special=True)
            for t in self.special_tokens
            if (i := self.token_to_id(t)) is not None
        }

    def pad(
        self,
        encoded_inputs,
        padding: bool | str = True,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_attention_mask: bool | None = None,
        return_tensors: str | None = None,
        verbose: bool = True,
    ) -> BatchEncoding:
        """transformers' ``pad``: ``input_ids`` rows (a dict of lists, a list of dicts as a DataLoader's
        ``collate_fn`` gets, or one example) padded with the pad id to the longest (``padding=True``) or to
        ``max_length`` (``"max_length"``), rounded up to ``pad_to_multiple_of``; ``attention_mask`` made or padded
        with 0, ``token_type_ids`` with 0, ``special_tokens_mask`` with 1; other keys (``labels``) as given. Tensors
        in give tensors out. Nothing is truncated."""
        if (
            isinstance(encoded_inputs, (list, tuple))
            and encoded_inputs
            and isinstance(encoded_inputs[0], Mapping)
        ):
            keys = list(encoded_inputs[0].keys())
            for i, example in enumerate(encoded_inputs):
                if not isinstance(example, Mapping) or set(example.keys()) != set(keys):
                    raise ValueError(
                        f"pad: example {i} has keys {sorted(example) if isinstance(example, Mapping) else example!r:.80}"
                        f", example 0 has {sorted(keys)}: every example needs the same keys"
                    )
            encoded_inputs = {k: [example[k] for example in encoded_inputs] for k in keys}
        if not isinstance(encoded_inputs, Mapping) or "input_ids" not in encoded_inputs:
            got = (
                list(encoded_inputs.keys())
                if isinstance(encoded_inputs, Mapping)
                else type(encoded_inputs).__name__
            )
            raise ValueError(f"pad takes encodings holding input_ids (a dict or a list of dicts), got {got}")
        inputs = dict(encoded_inputs)
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(
                f"return_tensors={return_tensors!r}: 'pt' (torch), 'np' (numpy) or None (lists) only"
            )
        ids = inputs["input_ids"]
        first = ids[0] if len(ids) else None
        if isinstance(first, (list, tuple)) and not isinstance(first, torch.Tensor):
            first = next((r[0] for r in ids if len(r)), None)
        if first is not None and not isinstance(first, (int, list, tuple)) and return_tensors is None:
            return_tensors = (
                "pt" if isinstance(first, torch.Tensor) else "np"
            )  # tensors in, tensors out (as there)
        inputs = {k: _tolist(v) for k, v in inputs.items()}
        ids = inputs["input_ids"]
        single = not ids or not isinstance(ids[0], list)
        if single:
            inputs = {k: [v] for k, v in inputs.items()}
        sizes = {k: len(v) for k, v in inputs.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"pad: the keys hold batches of different sizes: {sizes}")
        pad, _, pad_to = _padding_truncation(self, padding, False, max_length)
        rows = inputs["input_ids"]
        length = pad_to if pad == "max_length" else max(map(len, rows), default=0) if pad else None
        m = pad_to_multiple_of
        if length is not None and m and length % m:
            length = (length // m + 1) * m
        side = self.padding_side if padding_side is None else padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        with_mask = return_attention_mask if return_attention_mask is not None else True
        if with_mask and "attention_mask" not in inputs:
            inputs["attention_mask"] = [[1] * len(r) for r in rows]
        fills = {"input_ids": self.pad_token_id, "token_type_ids": 0, "special_tokens_mask": 1}
        if with_mask:
            fills["attention_mask"] = 0
        for i, row in enumerate(rows):
            n = 0 if length is None else length - len(row)
            if n <= 0:
                continue
            if self.pad_token_id is None:
                raise ValueError(
                    f"padding={padding!r}: the tokenizer has no pad token (tokenizer_config.json pad_token)"
                )
            for key, fill in fills.items():
                if key in inputs:
                    v = inputs[key][i]
                    inputs[key][i] = [fill] * n + v if side == "left" else v + [fill] * n
        out = {}
        for k, v in inputs.items():
            if (
                return_tensors is not None
                and not single
                and len({len(r) for r in v if isinstance(r, list)}) > 1
            ):
                raise ValueError(
                    f"pad: {k} has rows of {sorted({len(r) for r in v})} items, which return_tensors="
                    f"{return_tensors!r} cannot stack (pad only pads input_ids, attention_mask, token_type_ids and "
                    "special_tokens_mask; pad the others yourself, e.g. labels with -100)"
                )
            v = v[0] if single and return_tensors is None else v
            out[k] = (
                torch.tensor(v) if return_tensors == "pt" else np.array(v) if return_tensors == "np" else v
            )
        return BatchEncoding(out)

    @property
    def added_tokens_encoder(self) -> dict[str, int]:
        """Special/added tokens -> ids, in id order (transformers' ``added_tokens_encoder``)."""
        return {t: i for t in self.special_tokens if (i := self.token_to_id(t)) is not None}

    def __call__(
        self,
        text: str | Sequence[str],
        text_pair: str | Sequence[str] | None = None,
        *,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        return_tensors: str | None = None,
        return_attention_mask: bool | None = None,
        add_special_tokens: bool = True,
        padding_side: str | None = None,
    ) -> BatchEncoding:
        """transformers' tokenizer call: ``input_ids`` and ``attention_mask`` of one text (lists of ints) or a batch
        (lists of rows; ``padding=True`` pads them to the longest on ``padding_side``, default
        :attr:`padding_side`; ``"max_length"`` to ``max_length``); ``return_tensors="pt"``/``"np"`` gives ``[B, S]``
        int64 tensors/arrays. ``truncation=True`` cuts each row to ``max_length`` (default ``model_max_length``) on
        :attr:`truncation_side`; ``max_length`` alone truncates too, as there. ``text_pair``: each pair's ids follow
        its text's. The same output as transformers' on the same files (tested)."""
        padding, cut_to, pad_to = _padding_truncation(self, padding, truncation, max_length)
        side = self.padding_side if padding_side is None else padding_side
        if self.truncation_side not in ("left", "right"):
            raise ValueError(f"truncation_side must be 'left' or 'right', got {self.truncation_side!r}")
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(
                f"return_tensors={return_tensors!r}: 'pt' (torch), 'np' (numpy) or None (lists) only"
            )
        single = isinstance(text, str)
        texts = [text] if single else list(text) if isinstance(text, (list, tuple)) else None
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"text must be a string or a non-empty list of strings, got {text!r:.80}")
        pairs = [None] * len(texts)
        if text_pair is not None:
            pairs = [text_pair] if isinstance(text_pair, str) else list(text_pair)
            if len(pairs) != len(texts) or not all(isinstance(t, str) for t in pairs):
                raise ValueError(
                    f"text_pair must be a string (with one text) or a list of {len(texts)} strings (one per text), "
                    f"got {text_pair!r:.80}"
                )
        rows = [self._encode(t, p, add_special_tokens) for t, p in zip(texts, pairs)]
        if cut_to is not None and text_pair is not None and any(len(r) > cut_to for r in rows):
            raise ValueError(
                f"truncation={truncation!r} of a text pair past {cut_to} tokens is not supported (which text loses "
                "tokens is a choice): cut each text's ids yourself, or drop truncation=/max_length="
            )
        if cut_to is not None:
            right = self.truncation_side == "right"
            rows = [r[:cut_to] if right else r[max(len(r) - cut_to, 0) :] for r in rows]
        masks = [[1] * len(r) for r in rows]
        length = pad_to if pad_to is not None else max(len(r) for r in rows)
        if padding and any(len(r) < length for r in rows):  # pad()'s rule: the pad id, mask 0, on `side`
            if self.pad_token_id is None:  # named with the padding asked for, not pad()'s max_length
                raise ValueError(
                    f"padding={padding!r}: the tokenizer has no pad token (tokenizer_config.json pad_token)"
                )
            padded = self.pad(
                {"input_ids": rows, "attention_mask": masks}, "max_length", length, padding_side=side
            )
            rows, masks = padded["input_ids"], padded["attention_mask"]
        length = max(len(r) for r in rows)
        if return_tensors is not None and any(len(r) != length for r in rows):
            raise ValueError(
                f"return_tensors={return_tensors!r} with rows of {sorted({len(r) for r in rows})} tokens: pass "
                "padding=True to pad them to the longest"
            )
        out = {"input_ids": rows}
        if return_attention_mask is not False:
            out["attention_mask"] = masks
        for k, v in out.items():
            if return_tensors == "pt":
                out[k] = torch.tensor(v, dtype=torch.long)
            elif return_tensors == "np":
                out[k] = np.array(v, dtype=np.int64)
            elif single:
                out[k] = v[0]
        return BatchEncoding(out)

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError(
            "the tokenizer renders no chat here: use processor.apply_chat_template(conversation, tokenize=False, "
            "add_generation_prompt=...) for the text (the same Music Flamingo template as transformers' tokenizer "
            "and processor; its add_generation_prompt defaults to True, the tokenizer's to False), or tokenize=True "
            "for the ids"
        )

    def require_id(self, token: str) -> int:
        """Id of ``token``; raises ``TokenizerError`` when it is not a single token of this vocabulary."""
        idx = self.token_to_id(token)
        if idx is None:
            raise TokenizerError(f"token {token!r} is not in the vocabulary of {type(self).__name__}")
        return idx


def _padding_truncation(
    tok: Tokenizer, padding, truncation, max_length
) -> tuple[str | None, int | None, int | None]:
    """transformers' padding and truncation rules for rows of one text: ``(padding, cut_to, pad_to)``, padding
    ``None``, ``"longest"`` or ``"max_length"``. As there: ``max_length`` alone truncates; ``padding=True`` ignores
    ``max_length``; without ``max_length`` truncation and ``"max_length"`` padding use ``model_max_length``, and do
    nothing when the files set none. (A text pair that would be cut is refused in :meth:`Tokenizer.__call__`.)"""
    if max_length is not None and (
        not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1
    ):
        raise ValueError(f"max_length={max_length!r}: expected a positive whole number of tokens")
    if max_length is not None and padding is False and truncation is None:
        truncation = "longest_first"
    if padding in (False, None, "do_not_pad"):
        pad = None
    elif padding is True or padding == "longest":
        pad = "longest"
    elif padding == "max_length":
        pad = "max_length"
    else:
        raise ValueError(
            f"padding={padding!r} is not supported (True/'longest' pads to the longest row, 'max_length' to "
            "max_length, False pads nothing)"
        )
    if truncation in (None, False, "do_not_truncate"):
        cut = False
    elif truncation is True or truncation in ("longest_first", "only_first"):
        cut = True
    else:
        raise ValueError(
            f"truncation={truncation!r} is not supported (True/'longest_first'/'only_first' cut each row to "
            "max_length, False cuts nothing)"
        )
    length = max_length
    if length is None and tok.model_max_length <= LARGE_INTEGER:
        length = tok.model_max_length
    if length is None:  # no limit in the files: transformers neither cuts nor pads to a length
        cut, pad = False, None if pad == "max_length" else pad
    return pad, length if cut else None, length if pad == "max_length" else None


def _added_entries(tok) -> dict[str, dict]:
    """``tokenizer.json``'s added tokens as tokenizer_config.json's ``added_tokens_decoder`` writes them."""
    return {
        str(i): {
            "content": t.content,
            "lstrip": t.lstrip,
            "normalized": t.normalized,
            "rstrip": t.rstrip,
            "single_word": t.single_word,
            "special": t.special,
        }
        for i, t in sorted(tok.get_added_tokens_decoder().items())
    }


def _tolist(v):
    """A tensor/array (or a list of them) as nested Python lists; anything else as is."""
    if hasattr(v, "tolist") and not isinstance(v, (list, tuple)):
        return v.tolist()
    if isinstance(v, (list, tuple)):
        return [_tolist(x) for x in v]
    return v


def _is_token(value) -> bool:
    """A token for add_special_tokens: a string or a ``tokenizers.AddedToken``."""
    return isinstance(value, str) or hasattr(value, "content")


def _token_text(value) -> str:
    return value if isinstance(value, str) else value.content


def _check_unicode(text: object) -> None:
    """TokenizerError naming the position when ``text`` holds a lone surrogate (not valid Unicode: text decoded
    with ``errors="surrogateescape"``); the tokenizer libraries fail on it with an error that names nothing."""
    if isinstance(text, str):
        try:
            check_typed_text(text, "the text to tokenize", forbidden=())
        except ValueError as e:
            raise TokenizerError(str(e)) from None


def read_json_object(path: Path, error: type[ValueError] = TokenizerError) -> dict:
    """The JSON object in ``path`` ({} when there is no such file); ``error`` naming the file when it is not
    UTF-8 JSON holding an object (a bare TypeError or UnicodeDecodeError from deep inside the loader otherwise).
    One reader for a checkpoint folder's small JSON files (tokenizer, processor and model configs)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise error(f"{path}: invalid JSON ({e})") from None
    except (UnicodeDecodeError, RecursionError):
        raise error(f"{path}: invalid JSON (not UTF-8, or nested too deeply)") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_str(value, field: str = "token") -> str | None:
    """``tokenizer_config.json`` stores tokens as strings or as ``{"content": ...}`` dicts."""
    token = value.get("content") if isinstance(value, dict) else value
    if token is not None and not isinstance(token, str):
        raise TokenizerError(f"tokenizer_config.json: {field}={value!r}: expected a token's text or null")
    return token


class HFTokenizer(Tokenizer):
    """A ``tokenizer.json`` (e.g. Qwen2's byte-level BPE) run by the ``tokenizers`` library.

    Gives the same ids as ``transformers.AutoTokenizer`` on the same files (tested), without transformers.
    """

    def __init__(self, tokenizer, config: dict | None = None) -> None:
        self._tok = tokenizer
        self.config = dict(config or {})
        added = self._tok.get_added_tokens_decoder()  # {id: AddedToken}
        self.special_tokens = tuple(t.content for _, t in sorted(added.items()) if t.special)
        eos = _token_str(self.config.get("eos_token"), "eos_token")
        pad = _token_str(self.config.get("pad_token"), "pad_token")
        # Defaults when tokenizer_config.json is silent: Qwen2's pad is <|endoftext|>; generation stops at <|im_end|>.
        if eos is None:
            eos = next((t for t in (END_OF_TURN, END_OF_TEXT) if self.token_to_id(t) is not None), None)
        if pad is None and self.token_to_id(END_OF_TEXT) is not None:
            pad = END_OF_TEXT
        self.eos_token, self.pad_token = eos, pad
        for name in ("bos_token", "unk_token", "sep_token", "cls_token", "mask_token"):
            setattr(self, name, _token_str(self.config.get(name), name))
        # transformers 5: extra_special_tokens (additional_special_tokens in older files) and the model-specific
        # named tokens (other "*_token" string keys, or extra_special_tokens written as a mapping)
        extra = self.config.get("extra_special_tokens")
        if not extra and "additional_special_tokens" in self.config:
            extra = self.config["additional_special_tokens"]
        named = {
            k: v
            for k, v in self.config.items()
            if k.endswith("_token") and k not in SPECIAL_TOKENS_ATTRIBUTES and isinstance(v, str)
        }
        if isinstance(extra, dict):
            named.update({k: _token_str(v, f"extra_special_tokens.{k}") for k, v in extra.items()})
            extra = []
        if not isinstance(extra, (list, type(None))):
            raise TokenizerError(
                f"tokenizer_config.json: extra_special_tokens={extra!r:.80}: expected a list of tokens"
            )
        self._extra_special = [_token_str(t, "extra_special_tokens") for t in extra or []]
        self._named_extra = {k: v for k, v in named.items() if v is not None}
        # what the files held, so that save() rewrites only what add_tokens/add_special_tokens changed since (a
        # folder loaded and saved again, as checkpoints and exports do, keeps its tokenizer_config.json as it was)
        self._loaded_extra = list(self._extra_special)
        self._loaded_added = _added_entries(self._tok)
        limit = self.config.get("model_max_length")
        if limit is not None:
            if not isinstance(limit, (int, float)) or isinstance(limit, bool) or not limit >= 1:
                raise TokenizerError(
                    f"tokenizer_config.json: model_max_length={limit!r}: expected a positive number of tokens"
                )
            self.model_max_length = int(limit) if limit < VERY_LARGE_INTEGER else VERY_LARGE_INTEGER
        self.truncation_side = self.config.get("truncation_side") or "right"
        if self.truncation_side not in ("left", "right"):
            raise TokenizerError(
                f"tokenizer_config.json: truncation_side={self.truncation_side!r}: expected 'left' or 'right'"
            )
        self.padding_side = self.config.get("padding_side") or "right"  # null: transformers' default
        if self.padding_side not in ("left", "right"):
            raise TokenizerError(
                f"tokenizer_config.json: padding_side={self.padding_side!r}: expected 'left' or 'right'"
            )

    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> HFTokenizer:
        from tokenizers import Tokenizer as _Tok

        d = Path(directory)
        path = d / "tokenizer.json"
        try:
            tok = _Tok.from_file(str(path))
        except Exception as e:
            raise TokenizerError(f"{path}: cannot load tokenizer.json ({e})") from None
        try:
            config = read_json_object(d / "tokenizer_config.json")
            _warn_undeclared_tokens(d, tok, config)
            out = cls(tok, config)
            out.name_or_path = os.fspath(directory)
            return out
        except TokenizerError as e:
            if str(e).startswith("tokenizer_config.json:"):  # a bad token field: name the folder too
                raise TokenizerError(f"{d / str(e)}") from None
            raise

    def _encode(self, text: str, text_pair: str | None, add_special_tokens: bool) -> list[int]:
        try:
            return self._tok.encode(text, text_pair, add_special_tokens=add_special_tokens).ids
        except TypeError:  # what `tokenizers` raises for a lone surrogate
            _check_unicode(text)
            _check_unicode(text_pair)
            raise

    def add_tokens(self, new_tokens, special_tokens: bool = False) -> int:
        """transformers' ``add_tokens`` (a token, a list, strings or ``tokenizers.AddedToken``): the number of new
        ids, each after the last (``len(tokenizer)`` grows: resize the model's embeddings to it). A token added
        before is not added again. ``special_tokens=True`` adds them as special (one id in any text, skipped
        by ``decode(skip_special_tokens=True)``). :meth:`save` writes them where transformers reads them."""
        if not new_tokens:
            return 0
        if not isinstance(new_tokens, (list, tuple)):
            new_tokens = [new_tokens]
        added = (
            self._tok.add_special_tokens(new_tokens) if special_tokens else self._tok.add_tokens(new_tokens)
        )
        decoder = self._tok.get_added_tokens_decoder()
        self.special_tokens = tuple(t.content for _, t in sorted(decoder.items()) if t.special)
        return added

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def _tokens_to_string(self, tokens: list[str]) -> str:
        decoder = self._tok.decoder  # byte-level BPE: "Ġ" -> " ", as transformers' fast tokenizers
        return decoder.decode(tokens) if decoder is not None else " ".join(tokens)

    @property
    def added_tokens_decoder(self) -> dict:
        return dict(sorted(self._tok.get_added_tokens_decoder().items()))

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, idx: int) -> str | None:
        return self._tok.id_to_token(int(idx))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    @property
    def added_tokens_encoder(self) -> dict[str, int]:
        return {t.content: i for i, t in sorted(self._tok.get_added_tokens_decoder().items())}

    def model_bytes(self) -> bytes:
        return self._tok.to_str().encode()

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` (readable by ``transformers.AutoTokenizer``)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(d / "tokenizer.json"))
        config = dict(self.config)
        config.setdefault("tokenizer_class", "Qwen2Tokenizer")
        config.update(eos_token=self.eos_token, pad_token=self.pad_token)
        for name in ("unk_token", "sep_token", "cls_token", "mask_token"):  # add_special_tokens may set them
            if getattr(self, name) != _token_str(config.get(name), name):  # as read: the file's form is kept
                config[name] = getattr(self, name)
        if self._extra_special != self._loaded_extra:  # add_special_tokens changed the list
            # under the key the file had: additional_special_tokens (the older key) is read by transformers 4 and 5,
            # while transformers 4 fails on an extra_special_tokens list ('list' object has no attribute 'keys')
            old_key = "additional_special_tokens" in config and not config.get("extra_special_tokens")
            if isinstance(config.get("extra_special_tokens"), dict):
                # its model-specific named tokens (audio_token) stay, as top-level keys (as transformers 5 writes)
                for key, value in self._named_extra.items():
                    config.setdefault(key, value)
            config["additional_special_tokens" if old_key else "extra_special_tokens"] = list(
                self._extra_special
            )
        config.pop("padding_side", None)
        if self.padding_side != "right":  # transformers' default is not written
            config["padding_side"] = self.padding_side
        config["bos_token"] = self.bos_token
        added = _added_entries(self._tok)
        if "added_tokens_decoder" in config and added != self._loaded_added:
            # transformers follows this list where there is one: tokens added since loading must be in it (it
            # would read them as text pieces); transformers 5 writes none, and reads tokenizer.json's. Unchanged
            # since loading, the file's list is kept as written.
            config["added_tokens_decoder"] = added
        config.setdefault("clean_up_tokenization_spaces", False)
        config.setdefault("split_special_tokens", False)
        (d / "tokenizer_config.json").write_text(
            json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8"
        )
        return d


def _warn_undeclared_tokens(directory: Path, tok, config: dict) -> None:
    """Added tokens of ``tokenizer.json`` that ``tokenizer_config.json``'s ``added_tokens_decoder`` leaves out
    (added with the ``tokenizers`` library): ``transformers`` follows the config and reads them as plain text, so
    a model trained or prompted here with their single ids would meet other ids there."""
    declared = config.get("added_tokens_decoder")
    if not isinstance(declared, dict):
        return  # no list to follow: transformers takes tokenizer.json's, as we do
    names = {v.get("content") for v in declared.values() if isinstance(v, dict)}
    missing = [t.content for _, t in sorted(tok.get_added_tokens_decoder().items()) if t.content not in names]
    if missing:
        logger.warning(
            "%s: added tokens %s are in tokenizer.json but not in tokenizer_config.json's added_tokens_decoder: "
            "here each is one id, transformers splits it into text pieces; add them there (transformers' "
            "tokenizer.add_tokens + save_pretrained writes both files)",
            directory,
            ", ".join(missing[:8]) + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""),
        )


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model whose special tokens are ``user_defined_symbols`` (always single pieces).

    Trained with identity normalisation, no dummy prefix and byte fallback, so ``decode(encode(s)) == s`` for any
    text, newlines and unicode included.
    """

    SPECIAL_FILE = "special_tokens.json"

    def __init__(self, model_file: str | os.PathLike, special: dict | None = None) -> None:
        import sentencepiece as spm

        self.model_file = Path(model_file)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.model_file))
        except Exception as e:
            raise TokenizerError(f"{self.model_file}: cannot load SentencePiece model ({e})") from None
        special = dict(special or {})
        self.special_tokens = tuple(special.get("special_tokens", SPECIAL_TOKENS))
        self.pad_token = special.get("pad_token", END_OF_TEXT)
        self.eos_token = special.get("eos_token", END_OF_TURN)
        self.unk_token = self._sp.id_to_piece(self._sp.unk_id())  # never made: byte fallback covers any text
        for t in self.special_tokens:
            idx = self._sp.piece_to_id(t)
            if idx == self._sp.unk_id() or self._sp.id_to_piece(idx) != t:
                raise TokenizerError(f"{self.model_file}: special token {t!r} is not a piece of the model")

    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> SentencePieceTokenizer:
        d = Path(directory)
        out = cls(d / "tokenizer.model", read_json_object(d / cls.SPECIAL_FILE))
        out.name_or_path = os.fspath(directory)
        return out

    def _encode(self, text: str, text_pair: str | None, add_special_tokens: bool) -> list[int]:
        # add_special_tokens adds nothing: the model has no BOS/EOS pieces (bos_id=eos_id=-1); a pair's ids follow
        try:
            ids = list(self._sp.encode(text, out_type=int))
            return ids if text_pair is None else ids + list(self._sp.encode(text_pair, out_type=int))
        except RuntimeError:  # what sentencepiece's binding raises for a lone surrogate
            _check_unicode(text)
            _check_unicode(text_pair)
            raise

    def _tokens_to_string(self, tokens: list[str]) -> str:
        return self._sp.decode_pieces(tokens)

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        if not skip_special_tokens:
            # sentencepiece drops control pieces only; user-defined ones decode to their text.
            return self._sp.decode(ids)
        skip = self.special_token_ids
        return self._sp.decode([i for i in ids if i not in skip])

    def token_to_id(self, token: str) -> int | None:
        idx = self._sp.piece_to_id(token)
        if idx == self._sp.unk_id() and token != self._sp.id_to_piece(idx):
            return None
        return idx

    def id_to_token(self, idx: int) -> str | None:
        idx = int(idx)
        return self._sp.id_to_piece(idx) if 0 <= idx < self._sp.get_piece_size() else None

    def __len__(self) -> int:  # special tokens are pieces of the model: vocab_size is the same
        return self._sp.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        return {self._sp.id_to_piece(i): i for i in range(self._sp.get_piece_size())}

    def model_bytes(self) -> bytes:
        return self._sp.serialized_model_proto()

    def save(self, directory: str | os.PathLike) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        target = d / "tokenizer.model"
        if target.resolve() != self.model_file.resolve():
            target.write_bytes(self.model_file.read_bytes())
        meta = {
            "special_tokens": list(self.special_tokens),
            "pad_token": self.pad_token,
            "eos_token": self.eos_token,
        }
        (d / self.SPECIAL_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        return d


class IncrementalDecoder:
    """Token ids in, printable text deltas out, never splitting a multi-byte character.

    Decodes a short window `ids[prefix:]` and emits what it adds to `ids[prefix:read]` (the vLLM scheme): the
    window keeps a little left context so SentencePiece's leading-space rule and byte-level BPE pieces of one
    character decode right; a trailing U+FFFD means an incomplete character, so nothing is emitted yet. Special
    tokens that decoding skips never enter the window (a run of them decodes to nothing: the window would grow with
    it, each token decoding the whole run again).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []  # every token pushed
        self._decoded: list[int] = []  # those that decode to text (skipped special tokens left out)
        self._skipped = tokenizer.special_token_ids if skip_special_tokens else set()
        self.prefix = 0  # into _decoded
        self.read = 0

    def push(self, token: int) -> str:
        token = int(token)
        self.ids.append(token)
        if token in self._skipped:
            return ""
        self._decoded.append(token)
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character is emitted as U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        before = self.tokenizer.decode(self._decoded[self.prefix : self.read], self.skip)
        after = self.tokenizer.decode(self._decoded[self.prefix :], self.skip)
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.prefix, self.read = self.read, len(self._decoded)
            return after[len(before) :]
        return ""


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Load the tokenizer saved in ``directory`` (``tokenizer.json`` wins over ``tokenizer.model``)."""
    d = Path(directory)
    if not d.is_dir():
        raise TokenizerError(f"{d}: tokenizer directory not found")
    if (d / "tokenizer.json").is_file():
        return HFTokenizer.from_dir(d)
    if (d / "tokenizer.model").is_file():
        return SentencePieceTokenizer.from_dir(d)
    raise TokenizerError(f"{d}: no tokenizer.json or tokenizer.model found")


def train_sentencepiece(
    texts_or_file: str | os.PathLike | Iterable[str],
    vocab_size: int,
    out_dir: str | os.PathLike,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
    model_type: str = "bpe",
    pad_token: str = END_OF_TEXT,
    eos_token: str = END_OF_TURN,
) -> SentencePieceTokenizer:
    """Train a SentencePiece model on a text file (one sentence per line) or an iterable of strings.

    ``special_tokens`` become user-defined symbols right after ``<unk>`` (id 0), in order. ``vocab_size`` is a
    soft limit: a small corpus gives a smaller vocabulary instead of an error.
    """
    import sentencepiece as spm

    for t in (pad_token, eos_token):
        if t not in special_tokens:
            raise ValueError(f"{t!r} must be one of special_tokens {list(special_tokens)}")
    min_size = 256 + len(special_tokens) + 1  # byte fallback pieces + specials + <unk>
    if vocab_size < min_size:
        raise ValueError(f"vocab_size={vocab_size} is too small: byte fallback needs at least {min_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kwargs = dict(
        model_prefix=str(out / "tokenizer"),
        vocab_size=vocab_size,
        model_type=model_type,
        user_defined_symbols=list(special_tokens),
        unk_id=0,
        bos_id=-1,
        eos_id=-1,
        pad_id=-1,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    if isinstance(texts_or_file, (str, os.PathLike)):
        path = Path(texts_or_file)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: training corpus not found")
        kwargs["input"] = str(path)
    else:
        lines = [t for text in texts_or_file for t in str(text).splitlines() if t.strip()]
        if not lines:
            raise ValueError("train_sentencepiece got no non-empty text")
        kwargs["sentence_iterator"] = iter(lines)
    try:
        spm.SentencePieceTrainer.train(**kwargs)
    except RuntimeError as e:
        raise ValueError(f"SentencePiece training failed: {e}") from None
    tok = SentencePieceTokenizer(out / "tokenizer.model", {"special_tokens": list(special_tokens)})
    tok.pad_token, tok.eos_token = pad_token, eos_token
    tok.save(out)
    return tok


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m musicflamingo.tokenizer", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train a SentencePiece tokenizer on a text corpus")
    tr.add_argument("--input", required=True, help="text file, one sentence per line")
    tr.add_argument("--vocab-size", type=int, default=2000)
    tr.add_argument("--out", required=True, help="output directory (tokenizer.model + special_tokens.json)")
    tr.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    args = parser.parse_args(argv)
    tok = train_sentencepiece(args.input, args.vocab_size, args.out, model_type=args.model_type)
    print(f"wrote {args.out}: vocab_size={len(tok)} pad={tok.pad_token_id} eos={tok.eos_token_id}")


if __name__ == "__main__":
    main()
