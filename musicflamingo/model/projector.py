"""Audio -> text-width projector (the reference's `MusicFlamingoMultiModalProjector`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from musicflamingo.model.config import MusicFlamingoConfig


class AudioProjector(nn.Module):
    """linear_1 -> exact erf GELU -> linear_2: (W, T, D_audio) -> (W, T, D_text)."""

    def __init__(self, config: MusicFlamingoConfig) -> None:
        super().__init__()
        d_a, d_t = config.audio.hidden_size, config.text.hidden_size
        self.linear_1 = nn.Linear(d_a, d_t, bias=config.projector_bias)
        self.linear_2 = nn.Linear(d_t, d_t, bias=config.projector_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x)))
