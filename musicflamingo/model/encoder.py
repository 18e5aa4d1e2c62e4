"""Whisper-style audio encoder (the reference's `AudioFlamingo3Encoder`).

conv stem -> learned positions -> pre-LN transformer blocks -> AvgPool(2) -> LayerNorm.
Shapes for the released checkpoint: (W, 128, 3000) mel -> (W, 1500, 1280) after conv2 -> (W, 750, 1280).
Dropout (config `dropout`, `attention_dropout`, `activation_dropout`) applies in training only, where the reference
applies it; with all three at 0 the fused training kernels run and outputs are bit-identical to the reference's.
"""

from __future__ import annotations

from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from musicflamingo.model.config import AudioEncoderConfig
from musicflamingo.model.fused import gelu_linear, project, records_grad, softmax_attention

IntOrTensor = TypeVar("IntOrTensor", int, torch.Tensor)


def conv_output_lengths(mel_lengths: IntOrTensor) -> tuple[IntOrTensor, IntOrTensor]:
    """Valid lengths after conv2 (stride 2) and after the avg pool: `(L1, post_len)`, for an int or a tensor.

    `post_len = ((L - 1)//2 + 1 - 2)//2 + 1` is the reference's `_get_feat_extract_output_lengths`: the number of
    audio tokens of a window with L valid mel frames. It is 750 for 3000 mel frames and 0 for a window with at
    most 2 valid frames (see the RoTE quirk in rote.py). The processor counts `<sound>` tokens with it too
    (`audio.features.tokens_from_frames`), so the two cannot drift apart.
    """
    after_conv = (mel_lengths - 1) // 2 + 1
    post = (after_conv - 2) // 2 + 1
    return after_conv, post


class EncoderAttention(nn.Module):
    """Bidirectional multi-head attention. Footgun: Whisper's `k_proj` has NO bias; q is scaled before SDPA."""

    def __init__(self, config: AudioEncoderConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout  # on the probabilities, training only
        self.q_proj = nn.Linear(d, d, bias=True)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=True)
        self.out_proj = nn.Linear(d, d, bias=True)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, norm: nn.Module | None = None
    ) -> torch.Tensor:
        """x: (W, T, D), normalised by `norm` first if given; mask: None or bool (W, 1, 1, T) of visible keys."""
        W, T, _ = x.shape
        shape = (W, T, self.num_heads, self.head_dim)
        # The reference multiplies q by the scale *before* attention and calls SDPA with scale=1.0; doing it the
        # other way round is mathematically equal but not bit-equal.
        # one GEMM when training; k and v go to attention as they are (q is scaled first)
        qkv = project(x, norm, [self.q_proj, self.k_proj, self.v_proj], own=(1, 2))
        q = (qkv[0] * self.scaling).view(shape).transpose(1, 2)
        k, v = (t.view(shape).transpose(1, 2) for t in qkv[1:])
        p = self.attention_dropout if self.training else 0.0
        if p == 0.0 and q.dtype == torch.bfloat16 and q.device.type == "cpu" and records_grad(q, k, v):
            # bf16 training on CPU: the flash kernel's bf16 backward is ~3x slower than plain matmuls at these
            # window lengths. Scores are rounded to bf16 before the float32 softmax, like eager attention. Only
            # when a gradient flows: a frozen tower (LoRA on the decoder) keeps the reference's SDPA numbers.
            a = softmax_attention(q, k, v, mask)
        else:
            # (W, H, T, hd); the probabilities dropped out with p in training (the fused path above has no dropout)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=1.0)
        return self.out_proj(a.transpose(1, 2).reshape(W, T, -1))


class EncoderLayer(nn.Module):
    def __init__(self, config: AudioEncoderConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.self_attn_layer_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.self_attn = EncoderAttention(config)
        self.final_layer_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.fc1 = nn.Linear(d, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, d)
        self.dropout = config.dropout  # on the attention and MLP outputs, before each residual add
        self.activation_dropout = config.activation_dropout  # after the GELU

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """h: (W, T, D); mask: None or bool (W, 1, 1, T) of visible keys."""
        # The norms go in with their inputs so training can fuse them into the following GEMM (fused.norm_linear).
        h = h + _dropout(self.self_attn(h, mask, norm=self.self_attn_layer_norm), self.dropout, self.training)
        a = project(h, self.final_layer_norm, [self.fc1])[0]  # (W, T, F)
        if type(self.fc2) is nn.Linear and not (self.training and self.activation_dropout):
            # not a LoRA adapter, no dropout between GELU and fc2: keep only fc1's output for backward
            out = gelu_linear(a, self.fc2.weight, self.fc2.bias)
        else:
            out = self.fc2(_dropout(F.gelu(a), self.activation_dropout, self.training))
        h = h + _dropout(out, self.dropout, self.training)
        if h.dtype == torch.float16:  # the reference clamps fp16 activations to avoid inf
            limit = torch.finfo(h.dtype).max - 1000
            h = h.clamp(-limit, limit)
        return h


class AudioEncoder(nn.Module):
    """Mel windows -> pooled, normalised frames.

    The frame mask is used only through its per-window count (a prefix mask), exactly like the reference.
    """

    def __init__(self, config: AudioEncoderConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.conv1 = nn.Conv1d(config.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        # Loaded from the checkpoint (not recomputed sinusoids) and frozen, as in the reference.
        self.embed_positions = nn.Embedding(config.max_source_positions, d)
        self.embed_positions.requires_grad_(False)
        self.layers = nn.ModuleList([EncoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.layer_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False

    def forward(self, features: torch.Tensor, features_mask: torch.Tensor | None = None) -> torch.Tensor:
        """features: (W, n_mels, 2*P) in model dtype; features_mask: (W, 2*P) ints -> (W, P/2, D)."""
        W, n_mels, n_frames = features.shape
        expected = self.config.mel_frames
        if n_mels != self.config.num_mel_bins or n_frames != expected:
            raise ValueError(
                f"input_features has shape {tuple(features.shape)}; the encoder expects "
                f"(windows, {self.config.num_mel_bins}, {expected})"
            )
        h = F.gelu(self.conv1(features))
        # (W, P, D), made contiguous once: an add keeps its input's strides, so the permuted conv layout would
        # otherwise run through every layer and each LayerNorm, reshape and matmul would copy it again.
        h = F.gelu(self.conv2(h)).permute(0, 2, 1).contiguous()
        h = h + self.embed_positions.weight
        h = _dropout(h, self.config.dropout, self.training)
        mask = None
        if features_mask is not None:
            lengths, _ = conv_output_lengths(features_mask.sum(-1).long())  # (W,)
            if bool(
                (lengths < h.shape[1]).any()
            ):  # any padding: SDPA needs a key mask; else the dense-free path
                mask = (torch.arange(h.shape[1], device=h.device) < lengths[:, None])[:, None, None, :]
        # A frozen tower on inputs that need no gradient builds no graph: checkpointing it would only keep every
        # layer's input alive (torch's checkpoint saves them whatever the grad mode), W x P x d per layer.
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        checkpointing = checkpointing and (h.requires_grad or any(p.requires_grad for p in self.parameters()))
        layerdrop = self.config.layerdrop if self.training else 0.0
        for layer in self.layers:
            if layerdrop > 0.0 and torch.rand([]) < layerdrop:  # the reference's draw: one per layer, CPU RNG
                continue
            if checkpointing:
                h = torch.utils.checkpoint.checkpoint(layer, h, mask, use_reentrant=False)
            else:
                h = layer(h, mask)
        h = F.avg_pool1d(h.permute(0, 2, 1), kernel_size=2, stride=2).permute(0, 2, 1)  # (W, P/2, D)
        return self.layer_norm(h)


def _dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """`F.dropout`, skipped (x itself, no copy) when it would do nothing."""
    return F.dropout(x, p, training=True) if training and p > 0.0 else x
