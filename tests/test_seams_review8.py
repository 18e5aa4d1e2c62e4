"""What training produces, used everywhere else: a run's export/ folder read by `transformers` (model, processor,
generation settings) and by our loaders; frozen parts bit-identical to the base; config.json's dtype that of the
stored weights; a resumed run exporting what an uninterrupted one exports; the merged LoRA folder computing what
the unmerged adapters compute."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_assets import PROCESSOR_CHAT_TEMPLATE, TOKENIZER_CHAT_TEMPLATE, make_tone, write_tiny_tokenizer
from train_fixtures import compose_train, write_dataset, write_processor

from musicflamingo import MusicFlamingo
from musicflamingo.checkpoint import CheckpointError, generation_config
from musicflamingo.training import train

transformers = pytest.importorskip("transformers")

SAMPLING = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 20, "max_new_tokens": 2048}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def _conversation() -> list:
    audio = make_tone(440.0, 3.0)
    return [
        [{"role": "user", "content": [{"type": "audio", "audio": audio}, {"type": "text", "text": "What?"}]}]
    ]


@pytest.fixture(scope="module")
def reference_base(tmp_path_factory):
    """A base folder as `transformers` writes one (the release's layout): a random tiny reference model with 2 s
    windows whose generation_config.json samples, and the reference processor (chat template, tokenizer)."""
    from reference_model import reference_config

    root = tmp_path_factory.mktemp("seams")
    config = reference_config()
    config.audio_config.max_source_positions = 100  # 2 s windows, as train_fixtures' processor
    torch.manual_seed(0)
    ref = transformers.MusicFlamingoForConditionalGeneration(config).eval()
    for key, value in SAMPLING.items():
        setattr(ref.generation_config, key, value)
    base = root / "base"
    ref.save_pretrained(base)
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        str(write_tiny_tokenizer(root / "tok")), chat_template=TOKENIZER_CHAT_TEMPLATE
    )
    extractor = transformers.WhisperFeatureExtractor(
        feature_size=128, return_attention_mask=True, chunk_length=2
    )
    processor = transformers.MusicFlamingoProcessor(
        feature_extractor=extractor, tokenizer=tokenizer, chat_template=PROCESSOR_CHAT_TEMPLATE
    )
    processor.save_pretrained(str(base))
    return base, processor, write_dataset(root / "data")


def test_an_align_projector_export_of_a_reference_base_is_the_base_where_frozen_and_reads_as_it(
    reference_base, tmp_path
):
    """experiment=align_projector from a folder `transformers` wrote, exported: the reference's processor reads the
    export as it read the base (same ids, features, chat template), its model computes our trained logits, the frozen
    audio tower and language model are the base's tensors bit for bit, config.json's dtype is the stored one, and
    generation_config.json keeps the base's decoding settings (the export wrote do_sample=false over the base's
    sampling, so transformers' generate() of the fine-tuned model decoded otherwise than the base's)."""
    base, base_processor, manifest = reference_base
    cfg = compose_train(
        tmp_path,
        manifest,
        base,
        ["experiment=align_projector", "debug=fast", "export=true", f"model.net.init_from={base}"],
    )
    _, obj = train(cfg)
    export = obj["export_dir"]

    # generation settings: the base's, as transformers reads them
    gen = transformers.GenerationConfig.from_pretrained(str(export))
    assert {k: getattr(gen, k) for k in SAMPLING} == SAMPLING
    assert gen.eos_token_id in (299, [299]) and gen.pad_token_id == 297

    # weights: frozen parts bit-identical, the projector trained; every tensor in config.json's dtype
    before, after = _tensors(base), _tensors(export)
    assert before.keys() == after.keys()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"multi_modal_projector"}, changed
    dtype = json.loads((export / "config.json").read_text())["dtype"]
    assert {str(t.dtype).removeprefix("torch.") for t in after.values()} == {dtype}

    # the reference processor reads the export as it read the base
    processor = transformers.MusicFlamingoProcessor.from_pretrained(str(export))
    kwargs = dict(tokenize=True, add_generation_prompt=True, return_dict=True)
    want = base_processor.apply_chat_template(_conversation(), **kwargs)
    got = processor.apply_chat_template(_conversation(), **kwargs)
    assert processor.chat_template == base_processor.chat_template
    for key in ("input_ids", "attention_mask", "input_features", "input_features_mask"):
        assert torch.equal(want[key], got[key]), key

    # the reference model of the export computes what training left in memory
    ref = transformers.MusicFlamingoForConditionalGeneration.from_pretrained(str(export)).eval()
    assert ref.dtype == getattr(torch, dtype)
    inputs = {k: got[k] for k in ("input_ids", "attention_mask", "input_features", "input_features_mask")}
    trained = obj["model"].model.eval()
    with torch.no_grad():
        diff = (ref(**inputs).logits - trained(**inputs).logits).abs().max().item()
    assert diff <= 1e-5


def test_generation_settings_survive_our_save_and_bad_ones_are_named(tmp_path):
    """`generation_config` keeps the file's decoding settings (not transformers' bookkeeping), a save writes them
    back unchanged, and a sampling setting of the wrong type is named with the file."""
    from tiny_checkpoint import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tmp_path / "ckpt")
    gen_file = ckpt / "generation_config.json"
    written = {
        **json.loads(gen_file.read_text()),
        **SAMPLING,
        "transformers_version": "5.0",
        "use_cache": True,
    }
    gen_file.write_text(json.dumps(written))
    loaded = MusicFlamingo.from_pretrained(ckpt)
    assert {k: loaded.generation_defaults[k] for k in SAMPLING} == SAMPLING
    assert "transformers_version" not in loaded.generation_defaults
    loaded.save_pretrained(tmp_path / "saved")
    again = json.loads((tmp_path / "saved" / "generation_config.json").read_text())
    assert {k: again[k] for k in [*SAMPLING, "use_cache"]} == {**SAMPLING, "use_cache": True}
    assert generation_config(tmp_path / "saved") == loaded.generation_defaults
    for key, bad in (("do_sample", "yes"), ("temperature", "0.7"), ("top_k", 2.5), ("top_p", True)):
        gen_file.write_text(json.dumps({**written, key: bad}))
        with pytest.raises(CheckpointError, match=rf"generation_config.json: {key} must be"):
            generation_config(ckpt)


@pytest.mark.slow
def test_a_resumed_lora_run_exports_the_uninterrupted_runs_folder_and_merges_exactly(tmp_path):
    """LoRA with dropout (the RNG matters), 4 steps straight vs 2 + 2 resumed from last.ckpt: the two export folders
    hold the same tensors, and the merged folder computes what the unmerged adapters compute."""
    proc = write_processor(tmp_path / "proc")
    manifest = write_dataset(tmp_path / "data", n=8)
    common = [
        "experiment=lora",
        "export=true",
        "model.net.lora.dropout=0.1",
        "data.batch_max_tokens=800",
        "model.scheduler.max_steps=4",
        "model.scheduler.warmup_steps=0",
        "callbacks.model_checkpoint.every_n_train_steps=1",
    ]
    _, straight = train(compose_train(tmp_path / "a", manifest, proc, [*common, "trainer.max_steps=4"]))
    train(compose_train(tmp_path / "b", manifest, proc, [*common, "trainer.max_steps=2"]))
    _, resumed = train(compose_train(tmp_path / "b", manifest, proc, [*common, "trainer.max_steps=4"]))
    assert resumed["trainer"].global_step == 4
    a, b = _tensors(straight["export_dir"]), _tensors(resumed["export_dir"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    merged = MusicFlamingo.from_pretrained(resumed["export_dir"])
    unmerged = resumed["model"].model.eval()
    ids = torch.randint(0, 297, (2, 9))
    with torch.no_grad():
        assert (merged(ids).logits - unmerged(ids).logits).abs().max().item() <= 1e-5
