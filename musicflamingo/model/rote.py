"""Rotary Time Embedding (RoTE), exactly as the reference `MusicFlamingoRotaryEmbedding`.

Axial rotary over (window index within its audio, frame index within the window), both modulated by the absolute
time of the frame in seconds. Rotates the first `2 * dim_per_axis` channels of the encoder output (512 of 1280 for
the release) and passes the rest through.

Footguns, all reproduced on purpose for parity:
* RoTE rotates *interleaved* pairs (x[2i], x[2i+1]); Qwen2's RoPE rotates halves.
* The window axis has no 2*pi factor, the time axis has one (see `position_angles`).
* Buffers are float32 and stay float32 under bf16; the rotation itself runs in float64.
* Window indices are rebuilt from the `<sound>` runs in `input_ids`, not passed by the processor. A window with
  post-pool length 0 (an audio whose last window holds <= 2 mel frames) is attributed to the *next* audio, whose
  windows then count from 1 (`build_audio_timestamps`, `quirk=True`, the reference behaviour). `quirk=False`
  attributes windows by their own audio instead; it only differs in that corner case.
"""

from __future__ import annotations

from math import pi

import torch
from torch import nn

from musicflamingo.model.config import MusicFlamingoConfig


class RotaryTimeEmbedding(nn.Module):
    """Computes RoTE cos/sin `(W, T, 2*dim)` float32 from timestamps `(W, T)` in seconds."""

    def __init__(self, config: MusicFlamingoConfig) -> None:
        super().__init__()
        self.frame_step = config.audio_frame_step
        self.max_positions = config.rote_theta  # HF: max_position_embeddings = rope_theta (a float, 1200.0)
        dim = config.rote_dim_per_axis
        self.dim = dim
        self.theta = config.rote_theta
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)  # (dim/2,)
        self.register_buffer("position_angles", self.compute_position_angles(self.inv_freq), persistent=False)

    def compute_inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        return 1.0 / (
            self.theta ** (torch.arange(0, self.dim, 2, dtype=torch.float32, device=device) / self.dim)
        )

    def compute_position_angles(self, inv_freq: torch.Tensor) -> torch.Tensor:
        """(max_positions, dim): angle of frame j on the time axis, pairs repeated (interleaved layout)."""
        positions = torch.arange(int(self.max_positions), dtype=torch.float32, device=inv_freq.device)
        positions = positions / self.max_positions * (2 * pi)
        return torch.repeat_interleave(positions[:, None] * inv_freq, 2, dim=-1)

    def reset_buffers(self, device: torch.device) -> None:
        """Recompute the float32 buffers in place (after meta-device init or a dtype cast of the module)."""
        self.inv_freq = self.compute_inv_freq(device)
        self.position_angles = self.compute_position_angles(self.inv_freq)

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202
        # `model.to(torch.bfloat16)` would cast these buffers and change the numbers: keep them float32.
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32 and self.inv_freq.device.type != "meta":
            self.reset_buffers(self.inv_freq.device)
        return self

    @torch.no_grad()
    def forward(self, timestamps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """timestamps: (W, T) float32 seconds -> cos, sin: (W, T, 2*dim) float32."""
        W, T = timestamps.shape
        if T > self.position_angles.shape[0]:
            raise ValueError(
                f"RoTE supports at most {self.position_angles.shape[0]} frames per window, got {T}"
            )
        inv_freq, angles = self.inv_freq, self.position_angles
        if inv_freq.dtype != torch.float32 or angles.dtype != torch.float32:
            # FSDP's mixed precision (Lightning's for bf16-mixed/true) casts buffers in place (`buffer.data = ...`),
            # past `_apply`: bf16 angles put the frames of later seconds off by radians. Use float32 ones.
            inv_freq = self.compute_inv_freq(inv_freq.device)
            angles = self.compute_position_angles(inv_freq)
        timestamps = timestamps.to(device=inv_freq.device, dtype=torch.float32)
        window_duration = self.frame_step * 4 * T  # Python float: 0.01*4*750 == 30.0 exactly
        window_pos = torch.round(timestamps[:, 0] / window_duration) / self.max_positions  # (W,) = w_idx/1200
        win = torch.repeat_interleave(window_pos[:, None] * inv_freq, 2, dim=-1)  # (W, dim)
        win, tim = torch.broadcast_tensors(win[:, None, :], angles[:T][None, :, :])
        freqs = torch.cat((win, tim), dim=-1)  # (W, T, 2*dim): window axis first, time axis second
        angle = (-timestamps * 2 * pi).to(freqs)
        freqs = freqs * angle[..., None]
        return freqs.cos(), freqs.sin()


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """Interleaved rotate-half: (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    x1, x2 = x.reshape(*x.shape[:-1], -1, 2).unbind(dim=-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rotary_time_emb(h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] channels of h (W, T, D) in float64 and cast back to h's dtype."""
    dtype = h.dtype
    work = torch.float32 if h.device.type == "mps" else torch.float64
    h = h.to(work)
    cos, sin = cos.to(h), sin.to(h)
    rot_dim = cos.shape[-1]
    rotated, passthrough = h[..., :rot_dim], h[..., rot_dim:]
    rotated = rotated * cos + rotate_pairs(rotated) * sin
    return torch.cat((rotated, passthrough), dim=-1).to(dtype)


def build_audio_timestamps(
    input_ids: torch.Tensor,
    post_lengths: torch.Tensor,
    frames_per_window: int,
    audio_token_id: int,
    frame_step: float,
    quirk: bool = True,
) -> torch.Tensor:
    """Seconds of every encoder frame: `t[w, j] = w_idx * T * 4*step + j * 4*step` -> (W, T) float32.

    input_ids: (B, S) with one contiguous run of `audio_token_id` per audio (row-major order = audio order).
    post_lengths: (W,) valid post-pool frames per window, windows in processor order.
    """
    device = post_lengths.device
    is_audio = (input_ids == audio_token_id).int()
    diff = torch.diff(torch.nn.functional.pad(is_audio, (1, 1), value=0), dim=1)
    _, starts = torch.where(diff == 1)
    _, ends = torch.where(diff == -1)
    run_lengths = (ends - starts).to(device=device, dtype=torch.long)  # tokens per audio
    n_tokens, n_frames = int(is_audio.sum()), int(post_lengths.sum())
    if n_tokens != n_frames:
        raise ValueError(
            f"audio placeholder tokens and audio frames do not match: {n_tokens} <sound> tokens in input_ids, "
            f"{n_frames} valid audio frames from input_features_mask"
        )
    step = frame_step * 4
    offsets = torch.arange(frames_per_window, device=device, dtype=torch.float32) * step
    W = post_lengths.shape[0]
    if quirk:
        # Reference algorithm: a window belongs to the audio whose token run contains its first token offset.
        # Integer offsets: a float tensor here takes torch's default dtype, which Lightning sets to bfloat16 for
        # the forward under trainer.precision=bf16-true; bf16 holds integers exactly only up to 256, so the token
        # offsets of later windows rounded across an audio's boundary (windows given to the wrong audio).
        post = post_lengths.long()
        first_token = torch.cat([post.new_zeros(1), torch.cumsum(post, 0)[:-1]])
        audio_of_window = torch.searchsorted(torch.cumsum(run_lengths, 0), first_token, right=True)
        if W and int(audio_of_window.max()) >= run_lengths.shape[0]:
            raise IndexError(
                "RoTE quirk: the last audio's last window has 0 valid frames (<= 2 mel frames) and the reference "
                "attributes it to a following audio that does not exist; pass quirk=False or trim the audio"
            )
        first_row = torch.searchsorted(audio_of_window, torch.arange(run_lengths.shape[0], device=device))
        window_idx = torch.arange(W, device=device) - first_row[audio_of_window]
    else:
        window_idx = _window_index_by_audio(run_lengths, post_lengths)
    # float32 explicitly: `long * float` would take the default dtype (bfloat16 under bf16-true: window 19 of 30 s
    # windows started at 568 s, not 570)
    return (window_idx[:, None] * frames_per_window).to(torch.float32) * step + offsets


def _window_index_by_audio(run_lengths: torch.Tensor, post_lengths: torch.Tensor) -> torch.Tensor:
    """Window index within its audio, assigning zero-length windows to the audio they were cut from."""
    idx = torch.zeros_like(post_lengths)
    w = 0
    for run in run_lengths.tolist():
        k, total = 0, 0
        while w < post_lengths.shape[0] and (total < run or (k > 0 and int(post_lengths[w]) == 0)):
            idx[w] = k
            total += int(post_lengths[w])
            k += 1
            w += 1
    return idx
