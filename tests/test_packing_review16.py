"""Review round 16, packing journey: several conversations per row (`data.pack=true`) with length-bucketed batches.

Mixed records (multi-turn with two audios, think answers, text-only with a system turn, one record exactly at the
row budget): packed rows give every conversation the summed loss and the gradients it gets alone, the labels a row
learns are each conversation's own, and the data module hands out the same packed batches with workers as without
and after a mid-epoch resume.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from tiny_assets import TINY_IDS, make_tone, write_audio
from train_fixtures import write_dataset, write_processor

from musicflamingo import MusicFlamingo, MusicFlamingoConfig
from musicflamingo.chat import IGNORE_INDEX, THINK_SUFFIX
from musicflamingo.data.collate import collate, collate_packed
from musicflamingo.data.dataset import ConversationDataset
from musicflamingo.data.manifest import read_manifest
from musicflamingo.data.sampler import MixtureDataset, TokenBudgetBatchSampler
from musicflamingo.processor import MusicFlamingoProcessor


def _records(n: int = 6) -> list[dict]:
    out = []
    for i in range(n):
        kind = i % 4
        if kind == 0:  # two audios, two assistant turns
            conv = [
                {"role": "user", "content": "<sound>What is this?"},
                {"role": "assistant", "content": "a low hum" + " x" * i},
                {"role": "user", "content": "<sound>And this one?"},
                {"role": "assistant", "content": "a bright tone"},
            ]
            out.append({"id": f"two{i}", "audio": ["low.wav", "high.wav"], "conversations": conv})
        elif kind == 1:  # the think layout
            conv = [
                {"role": "user", "content": f"<sound>Which note?\n{THINK_SUFFIX}"},
                {"role": "assistant", "content": "<think>one bright partial</think><answer>A5</answer>"},
            ]
            out.append({"id": f"think{i}", "audio": "high.wav", "conversations": conv})
        elif kind == 2:  # text only, its own system turn
            conv = [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi" * (i + 1)},
                {"role": "assistant", "content": "Hello there, friend."},
            ]
            out.append({"id": f"text{i}", "conversations": conv})
        else:
            conv = [
                {"role": "user", "content": "<sound>Describe."},
                {"role": "assistant", "content": "low" * i},
            ]
            out.append({"id": f"one{i}", "audio": "low.wav", "conversations": conv})
    return out


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A tiny random model (fp32) and the samples of six mixed records."""
    root = tmp_path_factory.mktemp("packing16")
    proc_dir = write_processor(root / "proc")
    write_audio(root / "low.wav", make_tone(220.0, 1.5))
    write_audio(root / "high.wav", make_tone(880.0, 2.5))
    manifest = root / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    processor = MusicFlamingoProcessor.from_pretrained(proc_dir)
    dataset = ConversationDataset(read_manifest(manifest), processor)
    samples = [dataset[i] for i in range(len(dataset))]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = MusicFlamingoConfig.from_name("tiny", audio={"max_source_positions": 100})
        model = MusicFlamingo(config).train()
        with torch.no_grad():  # biases at 0 and norms at 1 would leave their gradients untested
            for name, p in model.named_parameters():
                if name.endswith("bias") or "norm" in name:
                    p.add_(torch.randn_like(p) * 0.1)
    return model, processor, samples, root, manifest, proc_dir


def _summed(model, batch):  # noqa: ANN001, ANN202
    """(summed loss over the batch's label tokens, their count, {name: gradient of the summed loss})."""
    model.zero_grad(set_to_none=True)
    keys = ("input_ids", "attention_mask", "input_features", "input_features_mask", "labels")
    inputs = {k: batch[k] for k in (*keys, "position_ids", "seq_ids") if batch.get(k) is not None}
    out = model(**inputs, return_logits=False)
    (out.loss * out.num_label_tokens).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach() * out.num_label_tokens, out.num_label_tokens, grads


@pytest.fixture(scope="module")
def alone(mixed):
    """The summed loss, label tokens and summed gradients of the conversations run one at a time."""
    model, processor, samples, *_ = mixed
    total_loss, total, grads = 0.0, 0, {}
    for s in samples:
        one_loss, n, one = _summed(model, collate([s], processor.pad_token_id))
        total_loss, total = total_loss + one_loss, total + n
        for name, g in one.items():
            grads[name] = grads.get(name, 0) + g
    model.zero_grad(set_to_none=True)
    return total_loss, total, grads


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_packed_rows_sum_the_loss_and_gradients_of_each_conversation_alone(mixed, alone, checkpointing):
    """Several packed rows (a row budget the longest record fills exactly, so that rows break between
    conversations): the summed loss and its gradients equal the sums over the conversations run one at a time
    (attention run by run; `test_packing` checks the block mask against it)."""
    model, processor, samples, *_ = mixed
    model = copy.deepcopy(model)
    model.language_model.gradient_checkpointing = checkpointing
    pad = processor.pad_token_id
    lengths = [int(s["input_ids"].shape[0]) for s in samples]
    budget = max(lengths)
    packed = collate_packed(samples, pad, max_tokens=budget)
    rows = packed["input_ids"].shape[0]
    assert 1 < rows < len(samples) and packed["input_ids"].shape[1] == budget
    assert any((packed["seq_ids"][r] >= 0).sum() == budget for r in range(rows))  # a row filled to the budget

    loss, count, grads = _summed(model, packed)
    alone_loss, alone_count, alone_grads = alone
    assert count == alone_count > 0
    torch.testing.assert_close(loss, alone_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == alone_grads.keys() and any("audio_tower" in n for n in grads)
    for name, g in grads.items():
        torch.testing.assert_close(g, alone_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_packed_rows_learn_each_conversations_answers_only(mixed):
    """Labels in packed rows: each conversation's own labels (its answers and their <|im_end|>; never a system or
    user turn, an audio token or padding), its first token never a target, positions from 0 in each, and the audio
    windows in the row-major order of the <sound> runs."""
    _model, processor, samples, *_ = mixed
    lengths = [int(s["input_ids"].shape[0]) for s in samples]
    packed = collate_packed(samples, processor.pad_token_id, max_tokens=max(lengths))
    labels, seq = packed["labels"], packed["seq_ids"]
    assert (labels[seq < 0] == IGNORE_INDEX).all() and (packed["attention_mask"][seq < 0] == 0).all()
    for k, s in enumerate(samples):
        r, cols = torch.nonzero(seq == k, as_tuple=True)
        assert (r == r[0]).all() and cols.tolist() == list(range(int(cols[0]), int(cols[0]) + lengths[k]))
        assert torch.equal(packed["input_ids"][r, cols], s["input_ids"])
        assert labels[r[0], cols[0]] == IGNORE_INDEX and torch.equal(labels[r, cols][1:], s["labels"][1:])
        assert packed["position_ids"][r, cols].tolist() == list(range(lengths[k]))
    learned = labels != IGNORE_INDEX
    assert learned.any() and torch.equal(labels[learned], packed["input_ids"][learned])
    audio = (TINY_IDS.audio_token_id, TINY_IDS.audio_bos_token_id, TINY_IDS.audio_eos_token_id)
    assert not torch.isin(packed["input_ids"][learned], torch.tensor(audio)).any()
    windows = torch.cat([s["input_features"] for s in samples if len(s["input_features"])])
    assert torch.equal(packed["input_features"], windows)
    # each sample's labels are its answers alone (tests/test_loss_review8 checks which tokens those are)
    answers = [processor.decode(s["input_ids"][s["labels"] != IGNORE_INDEX].tolist(), False) for s in samples]
    assert all("Be brief" not in a and "Describe" not in a and "<sound>" not in a for a in answers)


def test_packed_batches_with_workers_equal_those_without(mixed):
    """data.num_workers=2 hands out the packed rows of num_workers=0, epoch by epoch: ids, tokens, labels, positions,
    conversation ids and audio windows."""
    from musicflamingo.data.datamodule import MusicFlamingoDataModule

    _model, processor, samples, _root, manifest, _proc = mixed
    budget = max(int(s["input_ids"].shape[0]) for s in samples) + 60
    epochs = []
    for workers in (0, 2):
        dm = MusicFlamingoDataModule(
            train=str(manifest), processor=processor, pack=True, batch_max_tokens=budget, num_workers=workers
        )
        dm.setup("fit")
        seen = []
        for epoch in (0, 1):
            dm.train_sampler.set_epoch(epoch)
            seen.append(list(dm.train_dataloader()))
        epochs.append(seen)
    keys = ("input_ids", "labels", "position_ids", "seq_ids", "input_features")
    for without, with_workers in zip(*epochs):
        assert [b["ids"] for b in without] == [b["ids"] for b in with_workers]
        assert any(len(b["ids"]) > 1 for b in without)  # rows of several conversations
        for a, b in zip(without, with_workers):
            assert all(torch.equal(a[k], b[k]) for k in keys if a[k] is not None)


@pytest.mark.slow
def test_packed_training_resumed_mid_epoch_with_workers_trains_the_uninterrupted_batches(tmp_path):
    """data.pack=true with a DataLoader worker: a run stopped inside an epoch and resumed trains the packed rows,
    and ends with the weights, of the uninterrupted run."""
    import test_resume as tr

    assets = (write_processor(tmp_path / "proc"), write_dataset(tmp_path / "data", n=8))
    # test_resume's 800-token budget: two of the 350-380-token conversations a row, 4 rows an epoch
    common = ["data.pack=true", "data.num_workers=1", "callbacks.model_checkpoint.every_n_train_steps=3"]
    a, straight = tr._run(tmp_path, "a", assets, [*common, "trainer.max_steps=6"])
    tr._run(tmp_path, "b", assets, [*common, "trainer.max_steps=3"])  # stops after row 3 of 4
    b, resumed = tr._run(tmp_path, "b", assets, [*common, "trainer.max_steps=6"])
    steps = tr._steps(straight)
    assert len(steps) == 6 and all(len(ids) == 2 for _, _, ids in steps)
    assert tr._steps(resumed) == steps
    tr._assert_same_weights(a, b)


def test_packed_sampler_is_a_function_of_epoch_and_rank_and_resumes_mid_epoch():
    """Packed batches with a weighted mixture on 2 ranks: each (epoch, rank) gets the same rows from a fresh sampler
    (a restarted process), within the budget by token sum and together holding the epoch's draw, and a sampler
    loaded with a mid-epoch position hands out exactly the rest."""
    # two records exactly at the budget
    lengths = [int(n) for n in np.random.default_rng(0).integers(20, 400, size=60)] + [400, 400]
    mixture = MixtureDataset([list(range(40)), list(range(22))], weights=[1.0, 1.5], seed=5)

    def sampler(rank: int) -> TokenBudgetBatchSampler:
        return TokenBudgetBatchSampler(
            lengths,
            400,
            seed=5,
            num_replicas=2,
            rank=rank,
            packed=True,
            epoch_indices=mixture.epoch_indices,
            longest_epoch=mixture.longest_epoch,
            bucket_size_multiplier=2,
        )

    for epoch in (0, 3):
        rows = []
        for rank in (0, 1):
            a, b = sampler(rank), sampler(rank)
            a.set_epoch(epoch)
            b.set_epoch(epoch)
            mine = list(a)
            assert mine == list(b) and len(mine) == len(a)
            assert all(sum(lengths[i] for i in row) <= 400 for row in mine)
            rows.append(mine)
            resumed = sampler(rank)
            resumed.load_state_dict(a.state_dict(batches_consumed=2, epoch=epoch))
            assert list(resumed) == mine[2:]
        drawn = sorted(i for row in rows[0] + rows[1] for i in row)
        padded = len(rows[0]) + len(rows[1]) - sampler(0).num_batches  # rows repeated to even the ranks
        assert padded in (0, 1) and len(drawn) >= len(mixture.epoch_indices(epoch))
        assert sorted(set(drawn)) == sorted(set(mixture.epoch_indices(epoch).tolist()))


@pytest.mark.parametrize("saved_packed", [False, True], ids=["padded_then_packed", "packed_then_padded"])
def test_resume_with_data_pack_switched_names_the_setting(saved_packed):
    """A checkpoint of a padded run resumed with data.pack=true (or back) was refused as "num_batches was 5 when
    saved, now 4" (a count the user never set), and accepted where the counts happened to agree; the refusal now
    names the setting that wrote the checkpoint, as a changed batch_max_tokens is refused at any position."""
    lengths = [120, 250, 60, 330, 90, 180, 210, 40]  # 5 padded batches of at most 400 tokens, 4 packed rows
    saved = TokenBudgetBatchSampler(lengths, 400, seed=1, packed=saved_packed)
    state = saved.state_dict(batches_consumed=1)
    now = TokenBudgetBatchSampler(lengths, 400, seed=1, packed=not saved_packed)
    setting = f"data.pack={str(saved_packed).lower()}"
    with pytest.raises(ValueError, match=rf"were {'packed' if saved_packed else 'padded'} rows .*{setting}"):
        now.load_state_dict(state)
    for consumed in (0, len(saved)):  # at an epoch's boundary too
        with pytest.raises(ValueError, match=setting):
            now.load_state_dict(saved.state_dict(batches_consumed=consumed))
    TokenBudgetBatchSampler(lengths, 400, seed=1, packed=saved_packed).load_state_dict(
        state
    )  # the same: fine


# ---------------------------------------------------------------------------------------------- token estimates
def _ffmpeg(src, dst, *codec):  # noqa: ANN001, ANN202
    if shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None:
        pytest.skip("needs Debian's ffmpeg and ffprobe (make setup)")
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(src), *codec, str(dst)], check=True)
    return dst


def test_audio_only_ffmpeg_reads_counts_in_the_batch_budget(tmp_path):
    """A clip soundfile cannot read (m4a, mka, a raw AAC stream) was estimated as no audio at all: an m4a record of
    thousands of tokens passed the batch budget's check at setup and packed rows overflowed it (an extra row, or a
    row far past data.batch_max_tokens). Now the container's length (ffprobe) or, where none is stated, the decoded
    audio counts: the estimate is the sample's length, and a record over the budget is named at setup."""
    proc_dir = write_processor(tmp_path / "proc")
    wav = write_audio(tmp_path / "src.wav", make_tone(440.0, 5.0))
    _ffmpeg(wav, tmp_path / "a.mka", "-c:a", "pcm_s16le")  # the container states its length
    _ffmpeg(wav, tmp_path / "b.aac", "-c:a", "aac")  # raw ADTS: no length stated anywhere, decoded
    conv = [{"role": "user", "content": "<sound>Describe."}, {"role": "assistant", "content": "a tone"}]
    audios = ["a.mka", {"path": "a.mka", "offset": 1.5}, "b.aac", "src.wav"]
    records = [{"id": f"r{i}", "audio": a, "conversations": conv} for i, a in enumerate(audios)]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    processor = MusicFlamingoProcessor.from_pretrained(proc_dir)
    dataset = ConversationDataset(read_manifest(manifest), processor)
    actual = [int(dataset[i]["input_ids"].shape[0]) for i in range(len(dataset))]
    assert dataset.estimate_lengths() == actual
    assert actual[0] == actual[3] > actual[1]  # the whole clip, and the part after the offset

    from musicflamingo.data.datamodule import MusicFlamingoDataModule
    from musicflamingo.data.dataset import BadSampleError

    dm = MusicFlamingoDataModule(
        train=str(manifest), processor=processor, pack=True, batch_max_tokens=actual[1]
    )
    with pytest.raises(
        BadSampleError, match=rf"sample 'r0' \({re.escape(str(manifest))}:1\): {actual[0]} tokens"
    ):
        dm.setup("fit")
