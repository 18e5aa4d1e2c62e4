"""Music Flamingo: audio encoder -> RoTE -> projector, spliced into a Qwen2 decoder at `<sound>` placeholders.

input_features (W, 128, 3000) --audio_tower--> (W, 750, 1280) --RoTE--> --projector--> (W, 750, 3584)
keep rows j < post_len[w], window-major -> (N_audio, 3584)
embed_tokens(input_ids) (B, S, 3584); audio rows replace the <sound> positions in row-major order
Qwen2 -> norm -> lm_head -> logits (B, S, vocab)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from musicflamingo import engine
from musicflamingo.chat import IGNORE_INDEX
from musicflamingo.checkpoint import (
    checkpoint_files,
    generation_config,
    hf_to_ours,
    load_config,
    read_state_dict,
    write_state_dict,
)
from musicflamingo.model.config import MusicFlamingoConfig
from musicflamingo.model.encoder import AudioEncoder, conv_output_lengths
from musicflamingo.model.fused import linear_cross_entropy
from musicflamingo.model.layers import CacheView
from musicflamingo.model.projector import AudioProjector
from musicflamingo.model.quantize import load_method, quantize_model
from musicflamingo.model.qwen2 import Qwen2Model, segment_starts
from musicflamingo.model.rote import RotaryTimeEmbedding, apply_rotary_time_emb, build_audio_timestamps


@dataclass
class MusicFlamingoOutput:
    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    num_label_tokens: int = 0


def causal_lm_loss(
    hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module, chunk_size: int = 2048
) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy of `head(hidden[:, t])` against `labels[:, t+1]`, ignoring -100.

    The shift convention: labels are aligned with input_ids, position t predicts token t+1. Only labelled
    positions go through the head, in chunks of `chunk_size` rows (`fused.linear_cross_entropy`), so float32
    logits for the whole sequence never exist; under autograd the gradients wrt the hidden states and the head
    weight are formed chunk by chunk in the forward, with no recomputed head matmul. Returns
    `(loss, n_label_tokens)`; the loss is 0 (with a graph) when nothing is labelled, where the reference would
    return NaN. `head` is a bias-free `nn.Linear`.
    """
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1).to(h.device)
    keep = y != IGNORE_INDEX
    return labelled_loss(h[keep], y[keep], head, chunk_size)


def labelled_loss(
    h: torch.Tensor, y: torch.Tensor, head: nn.Module, chunk_size: int = 2048
) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy of `head(h)` (N, D) against y (N,), already shifted and without ignored entries."""
    n = int(y.numel())
    if n == 0:
        return h.sum() * 0.0, 0
    if type(head) is nn.Linear and head.bias is None:
        return linear_cross_entropy(h, head.weight, y, chunk_size), n
    # Any other head (e.g. a LoRA adapter): plain chunks, each checkpointed so its logits are not kept.
    total = h.new_zeros((), dtype=torch.float32)
    for i in range(0, n, chunk_size):
        hc, yc = h[i : i + chunk_size], y[i : i + chunk_size]
        total = total + torch.utils.checkpoint.checkpoint(_chunk_loss, head, hc, yc, use_reentrant=False)
    return total / n, n


def _chunk_loss(head: nn.Module, hc: torch.Tensor, yc: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hc).float(), yc, reduction="sum")


class MusicFlamingo(nn.Module):
    """The full model. Module names follow the checkpoint (see `musicflamingo.checkpoint.NAME_TABLE`)."""

    def __init__(self, config: MusicFlamingoConfig) -> None:
        super().__init__()
        self.config = config
        self.audio_tower = AudioEncoder(config.audio)
        self.pos_emb = RotaryTimeEmbedding(config)
        self.multi_modal_projector = AudioProjector(config)
        self.language_model = Qwen2Model(config.text)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        if config.text.tie_word_embeddings:
            self.lm_head.weight = self.language_model.embed_tokens.weight
        self.quantization: str | None = None  # set by `quantize_model`; a save records it in config.json
        self.rote_quirk = True  # reproduce the reference's zero-length-last-window attribution (see rote.py)
        # generation_config.json's decoding defaults (eos ids, pad, max_new_tokens), set by `from_pretrained`:
        # `generate()` without a length uses them, as the reference's does, and a save keeps them
        self.generation_defaults: dict[str, Any] = {}

    # ------------------------------------------------------------------ properties
    @property
    def dtype(self) -> torch.dtype:
        # the embedding: never quantized (`quantize_model` may make the head int8)
        return self.language_model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.embed_tokens.weight.device

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute the float32 rotary buffers (after meta init, `.to(dtype)` or loading)."""
        device = torch.device(device) if device is not None else self.device
        self.pos_emb.reset_buffers(device)
        self.language_model.rotary_emb.reset_buffers(device)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.audio_tower.gradient_checkpointing = enabled
        self.language_model.gradient_checkpointing = enabled

    def compile_layers(self) -> None:
        """`torch.compile` every encoder and decoder layer in place (training's `model.net.compile=true`). Layer by
        layer: the layers of a stack share one trace (their weights are graph inputs), the graphs stay small, and
        module names (checkpoints, FSDP wrapping) do not change."""
        for layer in (*self.audio_tower.layers, *self.language_model.layers):
            layer.compile()

    # ------------------------------------------------------------------ audio
    def encode_audio(
        self, input_features: torch.Tensor, input_features_mask: torch.Tensor | None, input_ids: torch.Tensor
    ) -> torch.Tensor:
        """(W, n_mels, F) features -> (N_valid_frames, D_text) audio embeddings in window-major order."""
        W = input_features.shape[0]
        if input_features_mask is None:
            input_features_mask = torch.ones(
                W, input_features.shape[-1], dtype=torch.long, device=input_features.device
            )
        features = input_features.to(dtype=self.dtype)
        h = self.audio_tower(features, input_features_mask)  # (W, T, D_a)
        _, post_len = conv_output_lengths(input_features_mask.sum(-1).long())  # (W,)
        timestamps = build_audio_timestamps(
            input_ids,
            post_len,
            h.shape[1],
            self.config.audio_token_id,
            self.config.audio_frame_step,
            quirk=self.rote_quirk,
        )
        cos, sin = self.pos_emb(timestamps.to(h.device))
        h = apply_rotary_time_emb(h, cos, sin)
        e = self.multi_modal_projector(h)  # (W, T, D_t)
        valid = torch.arange(e.shape[1], device=e.device)[None, :] < post_len.to(e.device)[:, None]
        return e[valid]

    def embed(
        self,
        input_ids: torch.Tensor,
        input_features: torch.Tensor | None = None,
        input_features_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with audio frames spliced into the `<sound>` positions: (B, S, D_t)."""
        embeds = self.language_model.embed_tokens(input_ids)
        placeholder = input_ids == self.config.audio_token_id
        if input_features is None:
            n = int(placeholder.sum())
            if n:
                raise ValueError(
                    f"input_ids contain {n} <sound> placeholder tokens but no input_features were given"
                )
            return embeds
        # (N_audio, D_t); `build_audio_timestamps` checks N_audio against the number of <sound> tokens
        audio = self.encode_audio(input_features, input_features_mask, input_ids)
        # masked_scatter fills in row-major (batch, then sequence) order: the i-th audio lands in the i-th run.
        return embeds.masked_scatter(placeholder[..., None], audio.to(embeds.dtype))

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        input_features_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: CacheView | None = None,
        inputs_embeds: torch.Tensor | None = None,
        return_logits: bool = True,
        logits_to_keep: int = 0,
        seq_ids: torch.Tensor | None = None,
    ) -> MusicFlamingoOutput:
        """input_ids (B, S) -> logits (B, S, V) and, with `labels` (B, S), the mean shifted cross-entropy.

        `inputs_embeds` (B, S, D): the prompt already embedded (`embed`), instead of ids and audio.
        `return_logits=False` skips the full logits (training): only labelled positions reach the head.
        `logits_to_keep=k` keeps the last k positions (generation). `cache`: where keys and values go
        (`KVCache.view_prefill`; the generation engine drives it).
        `seq_ids` (B, S): packed rows (`data.collate.collate_packed`), the conversation of every token; attention
        stays within each and `position_ids` restart in each. The loss is then the mean over every conversation's
        labelled tokens, as for the same conversations padded into separate rows: each conversation's first label is
        ignored here (as `collate_packed` already does), so no token learns to predict the next conversation.
        """
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("give input_ids or inputs_embeds")
            inputs_embeds = self.embed(input_ids, input_features, input_features_mask)
        elif input_features is not None:
            raise ValueError("inputs_embeds already hold the audio: do not pass input_features as well")
        if seq_ids is not None and labels is not None:
            labels = labels.masked_fill(segment_starts(seq_ids.to(labels.device)), IGNORE_INDEX)
        if labels is not None and not return_logits and cache is None:
            # Only the labelled positions reach the loss: the last decoder layer computes nothing else.
            y = labels[:, 1:].to(inputs_embeds.device)
            wanted = F.pad(y != IGNORE_INDEX, (0, 1))  # (B, S): position t predicts label t+1
            hidden = self.language_model(
                inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                output_rows=wanted,
                seq_ids=seq_ids,
            )
            loss, n = labelled_loss(hidden, y[y != IGNORE_INDEX], self.lm_head)
            return MusicFlamingoOutput(loss=loss, num_label_tokens=n)
        hidden = self.language_model(
            inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            seq_ids=seq_ids,
        )
        out = MusicFlamingoOutput()
        if labels is not None:
            out.loss, out.num_label_tokens = causal_lm_loss(hidden, labels, self.lm_head)
        if return_logits:
            h = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
            out.logits = self.lm_head(h)
        return out

    # ------------------------------------------------------------------ checkpoints and generation
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        mmap: bool = True,
        quantize: str | None = None,
    ) -> MusicFlamingo:
        """Load a Hugging Face layout folder (config.json + safetensors) in eval mode, never holding two copies of
        the weights: built on the meta device, then each tensor is assigned from the file.

        dtype None/"auto" is config.json's `dtype` (else `torch_dtype`), else the checkpoint's own floating dtype, as
        transformers loads it. With `mmap`, CPU weights already in that dtype are
        used straight from a private mapping of the file (no copy; see `checkpoint.read_state_dict`); `mmap=False`
        reads them into memory of their own. Rotary buffers are recomputed in float32.
        `quantize="int8"` / `"int4"` quantizes every linear after loading, one at a time (`model/quantize.py`); a
        checkpoint saved from such a model loads quantized as it is, without `quantize` (read, not mapped).
        """
        config = load_config(path)
        method = load_method(quantize, config.quantization, str(path))
        device = torch.device(device or "cpu")
        with torch.device("meta"):
            model = cls(config)
        if config.quantization:
            quantize_model(
                model, config.quantization
            )  # the structure; the checkpoint holds the quantized values
            # The CPU kernels need 64-byte aligned weights, which views of a mapped file rarely are: read them into
            # memory of their own instead of mapping and then copying (that held both, 2x the quantized bytes).
            mmap = False
        # tie_word_embeddings: the reference never ties (its `_tied_weights_keys` is None) and reads
        # `language_model.lm_head.weight` whatever the flag says, so a save writes the head too. A checkpoint with no
        # head (older saves of ours, quantized ones) uses the embedding; one whose head equals the embedding is tied
        # again; one whose head differs (the reference trained it apart) keeps it, as the reference computes.
        tied = config.text.tie_word_embeddings
        sd = model.state_dict()
        head_stored = not tied or any(hf_to_ours(n) == "lm_head.weight" for n in checkpoint_files(Path(path)))
        expected = {k: t.shape for k, t in sd.items() if head_stored or k != "lm_head.weight"}
        integer = {k: t.dtype for k, t in sd.items() if not t.dtype.is_floating_point}
        state = read_state_dict(path, expected, dtype=dtype, device=device, mmap=mmap, integer=integer)
        head = state.pop("lm_head.weight", None) if tied else None
        model.load_state_dict(state, strict=not tied, assign=True)
        del state, sd
        if tied:
            embedding = model.language_model.embed_tokens.weight
            if head is None or torch.equal(head, embedding):
                model.lm_head.weight = embedding
            else:
                model.lm_head.weight = nn.Parameter(head, requires_grad=embedding.requires_grad)
            del head
        model.reset_buffers(device)  # created on meta: rebuilt in float32 on the target device
        if method and not config.quantization:  # a quantized checkpoint's own method is built above
            quantize_model(model, method)
        model.generation_defaults = generation_config(path)
        return model.eval()

    def save_pretrained(
        self, path: str | Path, max_shard_size: int | str = "5GB", overwrite: bool = False
    ) -> None:
        """Write config.json + safetensors in the reference layout, all or nothing, into the folder `path`,
        replacing only those files (`checkpoint.save_files`): tokenizer files, subfolders and anything else in it
        stay. `transformers` loads what an unquantized model writes; a quantized model's folder is ours alone (the
        reference reads int8 tensors as floats without their scales). A `path` that is a file, holds another
        model's config.json or is a non-empty folder without our files is refused unless `overwrite`, and so is a
        quantized save over weights that are not quantized the same way."""
        state = self.state_dict()
        config = self.config
        if getattr(self, "quantization", None):
            config = dataclasses.replace(config, quantization=self.quantization)
        if getattr(self.lm_head, "weight", None) is self.language_model.embed_tokens.weight:  # tied
            # The reference never ties and would start a missing head at random: write it, a copy (safetensors
            # refuses shared storage). A quantized folder is ours alone: the head stays stored once, as the embedding.
            head = state.pop("lm_head.weight")
            if not config.quantization:
                state["lm_head.weight"] = head.clone()
        write_state_dict(
            state,
            config,
            path,
            max_shard_size=max_shard_size,
            dtype=self.dtype,
            overwrite=overwrite,
            generation=self.generation_defaults,
        )

    def generate(self, input_ids: torch.Tensor, **kwargs: object) -> torch.Tensor:
        """Prompt plus new ids (B, S + new): a thin caller of the engine (`musicflamingo.engine.generate`, whose
        arguments it takes; unknown ones raise TypeError)."""
        return engine.generate(self, input_ids, **kwargs)

    def stream_generate(self, input_ids: torch.Tensor, **kwargs: object) -> Iterator[torch.Tensor]:
        """Yield the new token of every row (B,) per step (`musicflamingo.engine.stream_generate`)."""
        return engine.stream_generate(self, input_ids, **kwargs)
