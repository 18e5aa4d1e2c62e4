"""LoRA to a merged Hugging Face folder, and checkpoint conversion: what a researcher does after a LoRA run.

A model with unmerged adapters saved with a bare KeyError; merging a quantized base whose `dequantize()` returns its
own storage changed the base (a second merge added the adapters twice); a weights file given where the folder goes
said the folder "does not exist"; a folder holding both a single file and a shard index loaded the index while
transformers reads the single file; a checkpoint stored in several floating dtypes loaded in all of them and failed
in its first matmul, where transformers loads it in config.json's dtype."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from musicflamingo import MusicFlamingo, MusicFlamingoConfig
from musicflamingo.checkpoint import CheckpointError
from musicflamingo.model.build import add_lora
from musicflamingo.model.lora import LORA_TARGETS, QuantizedLinear, QuantizedLoRALinear, merge_lora
from musicflamingo.runtime import RuntimeConfigError


def _tiny(seed: int = 0, dtype: torch.dtype = torch.float32) -> MusicFlamingo:
    torch.manual_seed(seed)
    model = MusicFlamingo(MusicFlamingoConfig.from_name("tiny")).to(dtype).eval()
    model.reset_buffers("cpu")
    return model


def _batch(config: MusicFlamingoConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """One row: 3 text tokens, one audio window between its markers, 8 text tokens; random mel features."""
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(0, config.audio_token_id, (n,), generator=g)  # noqa: E731
    audio = torch.tensor(
        [config.audio_bos_token_id]
        + [config.audio_token_id] * config.audio.tokens_per_window
        + [config.audio_eos_token_id]
    )
    ids = torch.cat([text(3), audio, text(8)])[None]
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "input_features": 0.5
        * torch.randn(1, config.audio.num_mel_bins, config.audio.mel_frames, generator=g),
        "input_features_mask": torch.ones(1, config.audio.mel_frames, dtype=torch.int32),
    }


def _with_trained_adapters(model: MusicFlamingo, targets=LORA_TARGETS) -> MusicFlamingo:
    lora = {"enabled": True, "rank": 4, "alpha": 12, "dropout": 0.1, "targets": list(targets)}
    add_lora(model, lora)
    with torch.no_grad():  # B starts at zero: give every adapter something to add
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.05)
    return model.eval()


# ---------------------------------------------------------------------------------------------- LoRA -> folder
def test_saving_unmerged_adapters_is_refused_by_name_and_the_merged_folder_loads_identically(tmp_path):
    """save_pretrained of a model with adapters: a CheckpointError naming them and merge_lora, nothing written (was
    a bare KeyError from the name table). Merged (a copy), the folder computes what the adapted model does (dropout
    off in eval), in ours and in transformers, and the adapters' formula is W + B A * alpha / rank."""
    import copy

    model = _with_trained_adapters(_tiny())
    with pytest.raises(CheckpointError, match=r"lora_A.*LoRA adapters.*merge_lora.*nothing was written"):
        model.save_pretrained(tmp_path / "unmerged")
    assert not (tmp_path / "unmerged").exists()

    merged = copy.deepcopy(model)
    assert merge_lora(merged) == len(LORA_TARGETS) * model.config.text.num_hidden_layers
    q = model.language_model.layers[0].self_attn.q_proj
    expected = q.weight + q.lora_B @ q.lora_A * (12 / 4)
    torch.testing.assert_close(merged.language_model.layers[0].self_attn.q_proj.weight, expected)
    merged.save_pretrained(tmp_path / "merged")

    batch = _batch(model.config)
    loaded = MusicFlamingo.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        want = model(**batch).logits
        assert torch.equal(model(**batch).logits, want)  # eval: no dropout on the adapters' input
        torch.testing.assert_close(loaded(**batch).logits, want, atol=1e-5, rtol=0)
    transformers = pytest.importorskip("transformers")
    ref = transformers.MusicFlamingoForConditionalGeneration.from_pretrained(
        tmp_path / "merged", dtype=torch.float32
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(ref(**batch).logits, want, atol=1e-5, rtol=0)


class _Float32StandIn(QuantizedLinear):
    """A quantized base that keeps a float32 weight and returns it from `dequantize()` (as bitsandbytes' NF4 class
    with a float32 compute dtype does before the weight is quantized)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", linear.weight.detach().float().clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> _Float32StandIn:
        return cls(linear)

    def dequantize(self) -> torch.Tensor:
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight.to(x.dtype), self.bias)


def test_merging_a_quantized_base_leaves_its_weight_alone():
    """`merged_linear` added B A * scale into the tensor `dequantize()` returned: the base's own weight here, so the
    base changed and a second merge (or the merged copy's weight, sharing it) held the adapters twice."""
    torch.manual_seed(0)
    base = _Float32StandIn.from_linear(nn.Linear(32, 16))
    adapter = QuantizedLoRALinear(base, rank=4, alpha=8, dropout=0.0, dtype=torch.float32)
    with torch.no_grad():
        adapter.lora_B.normal_()
    before = base.weight.clone()
    expected = before + adapter.lora_B.detach() @ adapter.lora_A.detach() * 2.0
    first = adapter.merged_linear()
    second = adapter.merged_linear()
    assert torch.equal(base.weight, before)
    torch.testing.assert_close(first.weight, expected)
    torch.testing.assert_close(second.weight, expected)
    x = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(first(x), adapter(x))


# ---------------------------------------------------------------------------------------------- conversion
def test_a_file_given_as_the_checkpoint_folder_is_named_as_a_file(tmp_path):
    """`model.net.init_from=<run>/export/model.safetensors` or `.../last.ckpt`: the message said the folder "does not
    exist" (it does, as a file); now it says so, with the folder to use."""
    from musicflamingo.model.build import create_model

    _tiny().save_pretrained(tmp_path / "export")
    weights = tmp_path / "export" / "model.safetensors"
    with pytest.raises(
        CheckpointError, match=rf"{weights} is a file, not a checkpoint folder.*{tmp_path / 'export'}"
    ):
        MusicFlamingo.from_pretrained(weights)
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"not a folder")
    with pytest.raises(CheckpointError, match=r"is a file, not a checkpoint folder.*ckpt_path="):
        create_model(None, init_from=ckpt)


def test_a_folder_with_a_single_file_and_a_shard_index_is_refused(tmp_path):
    """transformers' save_pretrained leaves the other kind in place (a single-file save over a sharded folder keeps
    the index): we read the index (or failed on its removed shards), transformers reads model.safetensors. Refused,
    naming both files and which one transformers reads."""
    old, new = _tiny(seed=0), _tiny(seed=1)
    folder = tmp_path / "ckpt"
    old.save_pretrained(folder, max_shard_size="200KB")
    new.save_pretrained(tmp_path / "single")
    shutil.copy(tmp_path / "single" / "model.safetensors", folder)
    with pytest.raises(
        CheckpointError,
        match=r"holds both model.safetensors and model.safetensors.index.json.*transformers reads model.safetensors",
    ):
        MusicFlamingo.from_pretrained(folder)
    for shard in folder.glob("model-*-of-*.safetensors"):
        shard.unlink()  # as transformers' single-file save leaves it: the index, no shards
    with pytest.raises(CheckpointError, match=r"holds both"):
        MusicFlamingo.from_pretrained(folder)
    (folder / "model.safetensors.index.json").unlink()
    loaded = MusicFlamingo.from_pretrained(folder)
    assert torch.equal(loaded.lm_head.weight, new.lm_head.weight)


def _store_norms_in_float32(folder) -> None:
    """Rewrite the folder's weights with every norm in float32 and the rest as saved (converted checkpoints often
    keep norms in float32)."""
    f = folder / "model.safetensors"
    state = load_file(f)
    save_file({k: v.float() if "norm" in k else v for k, v in state.items()}, f, metadata={"format": "pt"})


def test_a_checkpoint_stored_in_several_dtypes_loads_in_one(tmp_path):
    """Norms in float32, the rest in bfloat16: loaded in both, the first matmul failed ("mat1 and mat2 must have the
    same dtype") while transformers loads it in config.json's dtype. Now every floating tensor loads in that dtype
    (or, without one in config.json, the dtype most are stored in); an explicit dtype still wins."""
    model = _tiny(dtype=torch.bfloat16)
    folder = tmp_path / "mixed"
    model.save_pretrained(folder)
    _store_norms_in_float32(folder)
    batch = _batch(model.config)
    batch["input_features"] = batch["input_features"].bfloat16()

    loaded = MusicFlamingo.from_pretrained(folder)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        want = model(**batch).logits
        assert torch.equal(loaded(**batch).logits, want)  # norms round-trip exactly through float32
    config = json.loads((folder / "config.json").read_text())
    del config["dtype"]
    (folder / "config.json").write_text(json.dumps(config))
    assert {p.dtype for p in MusicFlamingo.from_pretrained(folder).parameters()} == {torch.bfloat16}
    as_fp32 = MusicFlamingo.from_pretrained(folder, dtype="float32")
    assert {p.dtype for p in as_fp32.parameters()} == {torch.float32}

    transformers = pytest.importorskip("transformers")
    config["dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(config))
    ref = transformers.MusicFlamingoForConditionalGeneration.from_pretrained(folder).eval()
    assert {p.dtype for p in ref.parameters()} == {torch.bfloat16}


def test_a_non_floating_dtype_is_refused_by_name(tmp_path):
    """`from_pretrained(dtype=torch.int8)`: torch's many-line load_state_dict RuntimeError ("Only Tensors of floating
    point and complex dtype can require gradients") for every weight; now one error naming the dtype and the choices."""
    _tiny().save_pretrained(tmp_path / "ckpt")
    with pytest.raises(
        RuntimeConfigError, match=r"dtype='int8': expected one of \['bfloat16', 'float16', 'float32'"
    ):
        MusicFlamingo.from_pretrained(tmp_path / "ckpt", dtype=torch.int8)


def test_the_lora_export_copies_the_weights_to_the_cpu_not_where_they_lie(tmp_path, monkeypatch):
    """`MusicFlamingoLit.export` merged into `copy.deepcopy(model)`: a second model on the training device at the
    end of a run (33 GB for the release's fp32 master weights on a GPU, which the planner does not count). The
    copy is now made tensor by tensor on the CPU: no parameter is deep-copied where it lies, the module under
    training keeps its adapters, and the export gives the adapted model's logits."""
    import functools

    from musicflamingo.lit import MusicFlamingoLit
    from musicflamingo.model.build import PARTS

    model = _with_trained_adapters(_tiny())
    batch = _batch(model.config)
    with torch.no_grad():
        want = model(**batch).logits
    lit = MusicFlamingoLit(
        model,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
        scheduler=functools.partial(torch.optim.lr_scheduler.ConstantLR, factor=1.0),
        part_lr=dict.fromkeys(PARTS),
        nonfinite_loss="stop",
    )

    def no_device_copy(self, memo):
        raise AssertionError("a parameter was deep-copied on its own device")

    monkeypatch.setattr(nn.Parameter, "__deepcopy__", no_device_copy)
    lit.export(tmp_path / "export")
    monkeypatch.undo()
    assert any(name.endswith("lora_A") for name, _ in lit.model.named_parameters())  # left untouched
    merged = MusicFlamingo.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, want, rtol=1e-5, atol=1e-5)
