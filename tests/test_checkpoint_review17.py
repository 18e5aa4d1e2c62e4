"""Review round 17, export-load journey: exported and shared folders loaded back, here and in the reference
(transformers + peft, built locally as the other tests do)."""

from __future__ import annotations

import pytest
import torch
from test_lora_review9 import _batch, _randomise

from musicflamingo import MusicFlamingo
from musicflamingo.model.peft_format import load_peft_adapter, save_peft_adapter

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    """A reference checkpoint with tie_word_embeddings=true whose head equals the embedding (as a tied base's
    save writes it): ours loads it tied, the reference (which never ties) as two equal tensors."""
    from reference_model import make_reference_model

    path = tmp_path_factory.mktemp("tied")
    ref = make_reference_model(seed=0, tie_word_embeddings=True)
    with torch.no_grad():
        ref.lm_head.weight.copy_(ref.model.language_model.embed_tokens.weight)
    ref.save_pretrained(path)
    return path


@pytest.mark.parametrize("saved", ["embed_tokens", "lm_head"])
def test_a_peft_folder_replacing_the_embedding_or_head_of_a_tied_base_loads_as_peft_computes(
    tied_dir, tmp_path, saved
):
    """A peft adapter trained on a tied base with modules_to_save=[embed_tokens] changed both the embedding and the
    head here (they share one tensor; the reference never ties): logits 35 off, silently. With [lm_head] it was
    refused as 'lm_head.weight: not a parameter of this model'. Now the replaced one is untied first: the logits
    are peft's, and the adapter saved back loads in peft to the same logits."""
    ref = transformers.MusicFlamingoForConditionalGeneration.from_pretrained(tied_dir, dtype=torch.float32)
    wrapped = peft.get_peft_model(
        ref, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=[saved])
    )
    _randomise(wrapped, ("lora_B.default.weight", "modules_to_save.default.weight"), std=0.5)
    wrapped.save_pretrained(tmp_path / "adapter")

    ours = MusicFlamingo.from_pretrained(tied_dir)
    assert ours.lm_head.weight is ours.language_model.embed_tokens.weight  # the case under test
    load_peft_adapter(ours, tmp_path / "adapter")
    batch = _batch(ours.config)
    batch.pop("labels")
    with torch.no_grad():
        want = wrapped.eval()(**batch).logits
        got = ours(**batch).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    save_peft_adapter(ours, tmp_path / "back", modules_to_save=[])
    base = transformers.MusicFlamingoForConditionalGeneration.from_pretrained(tied_dir, dtype=torch.float32)
    back = peft.PeftModel.from_pretrained(base, tmp_path / "back").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(**batch).logits, want, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def ref_dir(tmp_path_factory):
    from reference_model import make_reference_model

    path = tmp_path_factory.mktemp("ref")
    make_reference_model(seed=0).save_pretrained(path)
    return path


def test_a_model_folder_that_also_holds_a_peft_adapter_is_refused_by_name(ref_dir, tmp_path):
    """adapter_config.json + adapter_model.safetensors copied into a model folder (e.g. beside a merged export):
    transformers' from_pretrained puts the adapters on top of the folder's weights, ours loaded the weights alone,
    so the two computed different models (logits 0.07 apart here), silently. Now every load of the folder (the
    entry points' check included) names the adapter file and what to do."""
    import shutil

    from musicflamingo.checkpoint import CheckpointError, check_checkpoint_dir

    folder = tmp_path / "model"
    shutil.copytree(ref_dir, folder)
    base = transformers.MusicFlamingoForConditionalGeneration.from_pretrained(ref_dir, dtype=torch.float32)
    wrapped = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    _randomise(wrapped, ("lora_B.default.weight",), std=0.5)
    wrapped.save_pretrained(tmp_path / "adapter")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(tmp_path / "adapter" / name, folder / name)

    # the premise: the reference loads the adapters with the folder
    plain = transformers.MusicFlamingoForConditionalGeneration.from_pretrained(ref_dir, dtype=torch.float32)
    both = transformers.MusicFlamingoForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    batch = _batch(MusicFlamingo.from_pretrained(ref_dir).config)
    batch.pop("labels")
    with torch.no_grad():
        assert not torch.allclose(both.eval()(**batch).logits, plain.eval()(**batch).logits, atol=1e-3)

    with pytest.raises(
        CheckpointError, match=r"adapter_config\.json \(a peft LoRA adapter\) beside config\.json"
    ):
        MusicFlamingo.from_pretrained(folder)
    with pytest.raises(CheckpointError, match="load_peft_adapter"):
        check_checkpoint_dir(folder, need_tokenizer=False)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            lambda c: c.pop("audio_token_id"),
            r"config\.json leaves out audio_token_id: the reference's default 151669",
        ),
        (
            lambda c: c.pop("audio_config"),
            r"audio_config is missing; 'audio_config' and 'text_config' must be",
        ),
        (
            lambda c: c.__setitem__("text_config", None),
            r"text_config is None; 'audio_config' and 'text_config'",
        ),
    ],
    ids=["audio_token_id", "audio_config", "text_config-null"],
)
def test_a_config_json_missing_a_key_says_it_is_missing(ref_dir, tmp_path, edit, expected):
    """A key removed from config.json: the message named a value the file never held ('config.audio_token_id=151669
    is outside the allowed range [0, 302]') or called a missing audio_config not a JSON object. Now it says the
    file leaves it out (the reference loads both and fails later: no <sound> token matched, or a shape error per
    encoder tensor)."""
    import json
    import shutil

    from musicflamingo.checkpoint import CheckpointError

    folder = tmp_path / "model"
    shutil.copytree(ref_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=expected) as info:
        MusicFlamingo.from_pretrained(folder)
    assert str(folder / "config.json") in str(info.value)


@pytest.mark.parametrize("name", ["config.json", "generation_config.json", "adapter_config.json"])
def test_a_json_file_nested_too_deeply_is_named(ref_dir, tmp_path, name):
    """A config.json, generation_config.json or adapter_config.json of nested brackets (a corrupt copy) stopped the
    load with a bare RecursionError from json; now a CheckpointError names the file."""
    import shutil

    from musicflamingo.checkpoint import CheckpointError

    folder = tmp_path / "folder"
    shutil.copytree(ref_dir, folder)
    if name == "adapter_config.json":
        folder = tmp_path / "adapter"
        folder.mkdir()
    (folder / name).write_text("[" * 200_000)
    with pytest.raises(CheckpointError, match="nested too deeply") as info:
        if name == "adapter_config.json":
            load_peft_adapter(MusicFlamingo.from_pretrained(ref_dir), folder)
        else:
            MusicFlamingo.from_pretrained(folder)
    assert str(folder / name) in str(info.value)
