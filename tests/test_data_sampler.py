"""Token-budget batch sampler, weighted mixtures, and exact mid-epoch resume through the Lightning data module."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from musicflamingo.data.sampler import MixtureDataset, TokenBudgetBatchSampler

sys.path.insert(0, str(Path(__file__).parent))
from tiny_assets import write_tiny_tokenizer  # noqa: E402


def _lengths(n=200, seed=0):
    return np.random.default_rng(seed).integers(5, 120, size=n).tolist()


def _epoch(sampler, epoch):
    sampler.set_epoch(epoch)
    return [list(b) for b in sampler]


def test_budget_respected_and_every_sample_once():
    lengths = _lengths()
    s = TokenBudgetBatchSampler(lengths, max_tokens=400, seed=3)
    batches = _epoch(s, 0)
    assert len(batches) == len(s)
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 400
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    # grouping by length: padding waste is far below random batching
    waste = sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)
    assert waste < 0.2 * sum(lengths)


def test_deterministic_for_seed_and_epoch():
    lengths = _lengths()
    a, b = TokenBudgetBatchSampler(lengths, 400, seed=1), TokenBudgetBatchSampler(lengths, 400, seed=1)
    assert _epoch(a, 0) == _epoch(b, 0)
    assert _epoch(a, 1) == _epoch(b, 1)
    assert _epoch(a, 0) != _epoch(a, 1)
    assert _epoch(a, 0) != _epoch(TokenBudgetBatchSampler(lengths, 400, seed=2), 0)
    fixed = TokenBudgetBatchSampler(lengths, 400, shuffle=False)
    assert _epoch(fixed, 0) == _epoch(fixed, 5)


@pytest.mark.parametrize("drop_last", [False, True])
def test_distributed_ranks_disjoint_and_equal_length(drop_last):
    lengths = _lengths(203)
    world = 3
    per_rank = [
        _epoch(
            TokenBudgetBatchSampler(lengths, 300, seed=4, num_replicas=world, rank=r, drop_last=drop_last), 2
        )
        for r in range(world)
    ]
    assert len({len(p) for p in per_rank}) == 1
    single = _epoch(TokenBudgetBatchSampler(lengths, 300, seed=4), 2)
    n_pad = (-len(single)) % world
    if drop_last:
        expected_batches = len(single) - (len(single) % world)
        assert sum(len(p) for p in per_rank) == expected_batches
    else:
        assert sum(len(p) for p in per_rank) == len(single) + n_pad
    sets = [{i for b in p for i in b} for p in per_rank]
    if drop_last or n_pad == 0:
        for r in range(world):
            for q in range(r + 1, world):
                assert not sets[r] & sets[q]
    # interleaving the ranks' batches gives back the single-process list (same global order)
    merged = [per_rank[r][k] for k in range(len(per_rank[0])) for r in range(world)]
    assert merged[: min(len(merged), len(single))] == single[: min(len(merged), len(single))]


def test_state_dict_resume_gives_the_remaining_batches():
    lengths = _lengths()
    s = TokenBudgetBatchSampler(lengths, 400, seed=7, num_replicas=2, rank=1)
    s.set_epoch(3)
    full = [list(b) for b in s]
    it = iter(s)
    seen = [next(it) for _ in range(5)]
    state = s.state_dict()
    assert state["epoch"] == 3 and state["batches_consumed"] == 5
    resumed = TokenBudgetBatchSampler(lengths, 400, seed=7, num_replicas=2, rank=1)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
    rest = [list(b) for b in resumed]
    assert seen + rest == full
    assert len(resumed) == len(full)  # __len__ stays the full epoch
    resumed.set_epoch(4)
    assert [list(b) for b in resumed] == _epoch(
        TokenBudgetBatchSampler(lengths, 400, seed=7, num_replicas=2, rank=1), 4
    )
    with pytest.raises(ValueError, match="num_replicas was 2 when saved, now 1"):
        TokenBudgetBatchSampler(lengths, 400, seed=7).load_state_dict(state)


def test_oversized_samples():
    with pytest.raises(
        ValueError, match=r"1 sample\(s\) are longer than max_tokens=50 \(e.g. index 2 with 60"
    ):
        TokenBudgetBatchSampler([10, 20, 60, 5], 50)
    s = TokenBudgetBatchSampler([10, 20, 60, 5], 50, on_oversized="skip")
    assert s.oversized == [2]
    assert sorted(i for b in _epoch(s, 0) for i in b) == [0, 1, 3]


class _Range(torch.utils.data.Dataset):
    def __init__(self, n, tag):
        self.n, self.tag = n, tag

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return (self.tag, i)


def test_mixture_weights_and_determinism():
    mix = MixtureDataset([_Range(10, "a"), _Range(40, "b")], weights=[2.0, 0.25], seed=5)
    assert len(mix) == 50 and mix[12] == ("b", 2)
    e0, e0b, e1 = mix.epoch_indices(0), mix.epoch_indices(0), mix.epoch_indices(1)
    assert np.array_equal(e0, e0b)
    counts = np.bincount(e0, minlength=50)
    assert (counts[:10] == 2).all()  # weight 2: every sample of "a" twice
    assert counts[10:].sum() == 10 and counts[10:].max() == 1  # weight 0.25: a quarter of "b", no repeats
    assert set(e0[e0 >= 10]) != set(e1[e1 >= 10])  # a fresh quarter each epoch
    s = TokenBudgetBatchSampler(
        [3] * 50, 12, seed=5, epoch_indices=mix.epoch_indices, longest_epoch=mix.longest_epoch
    )
    assert sorted(i for b in _epoch(s, 0) for i in b) == sorted(e0.tolist())
    with pytest.raises(ValueError, match="weights must be finite"):
        MixtureDataset([_Range(3, "a")], weights=[-1.0])


# ---------------------------------------------------------------------- Lightning: exact resume mid-epoch
def _text_manifest(path, n):
    lines = []
    for i in range(n):
        conv = [
            {"role": "system", "content": "S."},
            {"role": "user", "content": "Q" * (1 + i % 7)},
            {"role": "assistant", "content": f"A{i}"},
        ]
        lines.append(json.dumps({"id": f"r{i}", "conversations": conv}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_datamodule_resume_continues_with_the_exact_next_batch(tmp_path):
    L = pytest.importorskip("lightning")
    from musicflamingo.data.datamodule import MusicFlamingoDataModule
    from musicflamingo.processor import MusicFlamingoProcessor
    from musicflamingo.tokenizer import load_tokenizer

    processor = MusicFlamingoProcessor(
        load_tokenizer(write_tiny_tokenizer(tmp_path / "tok")), chunk_length=1.0
    )
    manifest = _text_manifest(tmp_path / "train.jsonl", 24)

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append((self.current_epoch, tuple(batch["ids"])))
            return (self.w * batch["input_ids"].float().mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    def run(ckpt_path=None, save_every=None):
        dm = MusicFlamingoDataModule(train=str(manifest), processor=processor, batch_max_tokens=80, seed=1)
        model = Recorder()
        callbacks = []
        if save_every:
            callbacks.append(
                L.pytorch.callbacks.ModelCheckpoint(
                    dirpath=tmp_path / "ckpt",
                    every_n_train_steps=save_every,
                    save_top_k=-1,
                    filename="{step}",
                )
            )
        trainer = L.Trainer(
            max_epochs=2,
            logger=False,
            callbacks=callbacks,
            enable_checkpointing=bool(save_every),
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            default_root_dir=tmp_path,
        )
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        return model, dm

    stop = 15  # a checkpoint in the middle of epoch 1 (12 batches per epoch)
    full, dm = run(save_every=stop)
    per_epoch = len(dm.train_sampler)
    assert per_epoch + 1 < stop < 2 * per_epoch - 1
    assert len(full.seen) == 2 * per_epoch
    assert full.seen[:per_epoch] != full.seen[per_epoch:]  # reshuffled per epoch
    state = torch.load(tmp_path / "ckpt" / f"step={stop}.ckpt", weights_only=False)["MusicFlamingoDataModule"]
    assert state["sampler"]["epoch"] == 1 and state["sampler"]["batches_consumed"] == stop - per_epoch
    resumed, _ = run(ckpt_path=tmp_path / "ckpt" / f"step={stop}.ckpt")
    assert resumed.seen == full.seen[stop:]


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("weights", [None, [1.0, 0.3]])
def test_every_epoch_has_the_fixed_batch_count_and_all_its_samples(packed, weights):
    """Lightning reads len(dataloader) once and ends each epoch there: every epoch must make exactly len(sampler)
    batches per rank (reshuffled buckets made more in some epochs, and their last samples were never trained)."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(50, 600, size=1500).tolist()
    kwargs = dict(seed=0, bucket_size_multiplier=1, packed=packed)
    if weights is not None:
        mix = MixtureDataset([_Range(1000, "a"), _Range(500, "b")], weights=weights, seed=0)
        kwargs.update(epoch_indices=mix.epoch_indices, longest_epoch=mix.longest_epoch)
    for world in (1, 2):
        samplers = [
            TokenBudgetBatchSampler(lengths, 1200, num_replicas=world, rank=r, **kwargs) for r in range(world)
        ]
        first = [len(s) for s in samplers]  # what Lightning reads, once
        for epoch in range(8):
            per_rank = [_epoch(s, epoch) for s in samplers]
            assert [len(b) for b in per_rank] == first == [len(s) for s in samplers], epoch
            for batches in per_rank:
                for b in batches:
                    cost = sum(lengths[i] for i in b) if packed else len(b) * max(lengths[i] for i in b)
                    assert cost <= 1200
            wanted = np.arange(1500) if weights is None else mix.epoch_indices(epoch)
            seen = [i for batches in per_rank for b in batches for i in b]
            assert set(seen) == set(wanted.tolist()), epoch
            if world == 1:
                assert sorted(seen) == sorted(wanted.tolist())


@pytest.mark.parametrize("weight", [float("nan"), float("inf")])
def test_manifest_weight_must_be_finite(weight):
    from musicflamingo.data.datamodule import parse_manifest_spec

    spec = [{"path": "a.jsonl"}, {"path": "b.jsonl", "weight": weight}]
    with pytest.raises(ValueError, match=r"train\[1\]\.weight must be a finite number >= 0"):
        parse_manifest_spec(spec, "train")
