"""Checkpoint loading, review 19: a wrong-shaped tensor of a sharded checkpoint is named with the shard that holds
it (the message named the key alone, so which of the model-*-of-*.safetensors to fix was a search)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from musicflamingo import MusicFlamingo, MusicFlamingoConfig
from musicflamingo.checkpoint import CheckpointError


def test_a_wrong_shape_in_a_shard_names_the_shard_and_the_key(tmp_path):
    torch.manual_seed(0)
    MusicFlamingo(MusicFlamingoConfig.from_name("tiny")).save_pretrained(tmp_path, max_shard_size="300KB")
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) > 1
    key = "multi_modal_projector.linear_1.bias"
    shard = tmp_path / weight_map[key]
    tensors = load_file(shard)
    tensors[key] = torch.zeros(7)
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as error:
        MusicFlamingo.from_pretrained(tmp_path)
    message = str(error.value)
    assert f"wrong shapes (1): ['{shard.name}: {key}: checkpoint [7] vs model [" in message
