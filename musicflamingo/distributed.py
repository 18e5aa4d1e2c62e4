"""Distribution helpers kept out of the model code: FSDP wrapping policy for Music Flamingo blocks."""

from __future__ import annotations

from typing import Any

from musicflamingo.model.encoder import EncoderLayer
from musicflamingo.model.qwen2 import DecoderLayer

BLOCKS = {EncoderLayer, DecoderLayer}


def fsdp_strategy(activation_checkpointing: bool = True, **kwargs: Any) -> Any:
    """`FSDPStrategy` with one unit per transformer block (encoder and decoder) and optional block checkpointing."""
    from lightning.pytorch.strategies import FSDPStrategy

    if activation_checkpointing:
        kwargs.setdefault("activation_checkpointing_policy", BLOCKS)
    return FSDPStrategy(auto_wrap_policy=BLOCKS, **kwargs)
