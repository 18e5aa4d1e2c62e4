"""Data-parallel ranks read the same data: a manifest that differs between ranks (edited between their starts,
node-local copies) is refused on every rank naming the manifest and the ranks, not trained on silently; a rank that
cannot read its data is named on the others instead of leaving them waiting; validation counts every sample once
(no batches repeated to even out the ranks)."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
from tiny_assets import make_tone, write_audio
from train_fixtures import write_dataset, write_processor

from musicflamingo.data.sampler import TokenBudgetBatchSampler


def _module(train, proc, world: int = 1, rank: int = 0, **kwargs):  # noqa: ANN001, ANN202
    from musicflamingo.data.datamodule import MusicFlamingoDataModule

    dm = MusicFlamingoDataModule(train=train, processor=str(proc), seed=3, **kwargs)
    if world > 1:  # what Lightning's DDP hands the module: the world and this process's rank
        dm.trainer = SimpleNamespace(world_size=world, global_rank=rank)
    return dm


# ---------------------------------------------------------------------------------------------- validation


def test_validation_sampler_repeats_no_batch_across_ranks():
    lengths = [100] * 5  # 5 batches of one sample on 2 ranks: 3 + 2, nothing repeated
    seen = []
    for rank in range(2):
        s = TokenBudgetBatchSampler(lengths, 100, shuffle=False, num_replicas=2, rank=rank, even_ranks=False)
        mine = [i for b in s for i in b]
        assert len(s) == len(list(s)) == (3 if rank == 0 else 2)
        seen += mine
    assert sorted(seen) == list(range(5))
    # fewer batches than ranks: split, so that every rank validates on its own samples
    halves = [
        [
            i
            for b in TokenBudgetBatchSampler([10] * 4, 1000, False, num_replicas=3, rank=r, even_ranks=False)
            for i in b
        ]
        for r in range(3)
    ]
    assert all(halves) and sorted(sum(halves, [])) == [0, 1, 2, 3]


def test_ddp_val_loss_counts_each_validation_sample_once(tmp_path):
    """val/loss is a mean over every rank's label tokens: a batch repeated on one rank to even out the ranks' batch
    counts (as training needs) weighed its samples twice."""
    proc = write_processor(tmp_path / "proc")
    manifest = write_dataset(tmp_path / "d", n=5)
    seen = []
    for rank in range(2):
        dm = _module(str(manifest), proc, world=2, rank=rank, val=str(manifest), batch_max_tokens=400)
        dm.setup("fit")
        seen += [i for b in dm.val_sampler for i in b]
        assert len(dm.val_dataloader()) == len(list(dm.val_sampler))
    assert sorted(seen) == list(range(5)), seen


def test_ddp_validation_set_smaller_than_the_world_is_refused(tmp_path):
    proc = write_processor(tmp_path / "proc")
    manifest = write_dataset(tmp_path / "d", n=2)
    val = tmp_path / "d" / "val.jsonl"
    val.write_text(manifest.read_text().splitlines()[0] + "\n")
    dm = _module(str(manifest), proc, world=2, rank=1, val=str(val), batch_max_tokens=4096)
    with pytest.raises(ValueError, match=r"data.val: 1 sample\(s\) for 2 ranks"):
        dm.setup("fit")


# ---------------------------------------------------------------------------------------------- ranks agree

SCENARIOS = ("same", "edited", "audio", "missing")


def _write_rank_folders(root: Path) -> None:
    """root/<scenario>/rank<r>/data/{a,b}.jsonl + clips: rank 1's copy differs from rank 0's as the scenario says."""
    base = write_dataset(root / "base", n=4).parent
    (base / "train.jsonl").rename(base / "a.jsonl")
    lines = (base / "a.jsonl").read_text().splitlines()
    (base / "b.jsonl").write_text("\n".join(lines[:2]) + "\n")
    for scenario in SCENARIOS:
        for rank in range(2):
            shutil.copytree(base, root / scenario / f"rank{rank}" / "data")
    one = root / "edited" / "rank1" / "data" / "a.jsonl"  # an answer edited between the ranks' starts
    record = json.loads(lines[1])
    record["conversations"][1]["content"] = "a bright tone, edited"
    one.write_text("\n".join([lines[0], json.dumps(record), *lines[2:]]) + "\n")
    # the same records, another clip behind one of them (node-local audio that differs): other token lengths
    write_audio(root / "audio" / "rank1" / "data" / "clip0.wav", make_tone(110.0, 2.5))
    (root / "missing" / "rank1" / "data" / "b.jsonl").unlink()


def _rank(rank: int, root: str, proc: str, out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch.distributed as dist

    results = {}
    try:
        dist.init_process_group("gloo", init_method=f"file://{root}/pg", rank=rank, world_size=2)
        for scenario in SCENARIOS:
            os.chdir(Path(root) / scenario / f"rank{rank}")
            train = ["data/a.jsonl", {"path": "data/b.jsonl", "weight": 2.0}]  # the same path on every rank
            dm = _module(
                train, proc, world=2, rank=rank, val="data/b.jsonl", batch_max_tokens=800, num_workers=0
            )
            try:
                dm.setup("fit")
                results[scenario] = {"batches": [b for b in dm.train_sampler], "num": len(dm.train_sampler)}
            except Exception as e:  # noqa: BLE001
                results[scenario] = {"error": f"{type(e).__name__}: {e}"}
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        results["crash"] = traceback.format_exc()
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))


def test_ranks_reading_different_manifests_are_refused_on_every_rank(tmp_path):
    """Two gloo processes, each in its own folder, read `data/a.jsonl` and `data/b.jsonl` (weight 2): with equal
    copies they split the same batch list; with rank 1's manifest edited (same record count), its clip longer, or its
    second manifest missing, both ranks stop naming the manifest and the rank (they trained on other records than
    planned, or rank 0 waited forever for a rank that had stopped)."""
    proc = write_processor(tmp_path / "proc")
    _write_rank_folders(tmp_path)
    ctx = multiprocessing.get_context("fork")  # the imports inherited: no second start of torch and Lightning
    procs = [ctx.Process(target=_rank, args=(r, str(tmp_path), str(proc), str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for p in procs:
        if p.is_alive():
            p.kill()
            pytest.fail("a rank hung")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert "crash" not in r, r["crash"]

    same = [r["same"] for r in ranks]
    assert all("error" not in s for s in same), same
    assert same[0]["num"] == same[1]["num"] == len(same[0]["batches"]) == len(same[1]["batches"]) > 0

    for result in ranks:
        edited = result["edited"].get("error", "")
        assert "RankMismatchError" in edited and "data.train[0] (data/a.jsonl)" in edited, edited
        assert "rank(s) 1 read other records than rank 0" in edited and "data.train[1]" not in edited, edited
        audio = result["audio"].get("error", "")
        assert "data.train[0] (data/a.jsonl)" in audio and "other token lengths" in audio, audio
    # the rank that could not read its manifest raises its own error; rank 0 names it instead of waiting
    assert (
        "b.jsonl" in ranks[1]["missing"]["error"] and "RankMismatchError" not in ranks[1]["missing"]["error"]
    )
    missing = ranks[0]["missing"]["error"]
    assert "RankMismatchError: rank 1 could not set up its data" in missing and "b.jsonl" in missing, missing


# ---------------------------------------------------------------------------------------------- bad samples


def _bad_rank(rank: int, root: str, proc: str, manifest: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch.distributed as dist

    from musicflamingo.data.dataset import TooManyBadSamplesError

    result: dict = {}
    try:
        dist.init_process_group("gloo", init_method=f"file://{root}/pg_bad", rank=rank, world_size=2)
        dm = _module(
            manifest,
            proc,
            world=2,
            rank=rank,
            batch_max_tokens=400,
            bad_sample_policy="skip",
            max_bad_fraction=0.3,
        )
        dm.trainer.training, dm.trainer.current_epoch = True, 0
        dm.setup("fit")
        if rank == 1:  # a clip of rank 1's first batch goes missing: only rank 1 would see it
            first = next(iter(dm.train_sampler))[0]
            os.unlink(dm.train_dataset.datasets[0].records[first].audios[0].path)
        dist.barrier()
        records = dm.train_dataset.datasets[0].records
        for indices in dm.train_sampler:
            # the batch's bookkeeping as collate hands it on: the dataset's markers of the samples it skipped (the
            # others are not built: torch's thread pool in a process forked from pytest's can hang)
            bad = [dm.train_dataset[i] for i in indices if not os.path.exists(records[i].audios[0].path)]
            dm.on_before_batch_transfer({"num_samples": len(indices), "bad_samples": bad}, 0)
        tracker = dm.train_bad_samples
        result = {"seen": tracker.num_seen, "bad": [b.source for b in tracker.bad.values()]}
        try:
            tracker.check(final=True)  # the run's end: every rank must decide alike (export is a collective)
        except TooManyBadSamplesError as e:
            result["stopped"] = str(e)
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        result["crash"] = traceback.format_exc()
    Path(root, f"bad{rank}.json").write_text(json.dumps(result))


def test_ddp_bad_samples_are_counted_over_all_ranks(tmp_path):
    """Each rank counted only its own skipped samples: one missing clip among 4 (25 %, under max_bad_fraction=0.3)
    was half of rank 1's samples, so rank 1 alone stopped at the run's end while rank 0 went on (to an export that
    is a collective under FSDP: a hang), and rank 0's bad_samples.jsonl never listed the clip."""
    proc = write_processor(tmp_path / "proc")
    manifest = write_dataset(tmp_path / "d", n=4)
    ctx = multiprocessing.get_context("fork")
    args = (str(tmp_path), str(proc), str(manifest))
    procs = [ctx.Process(target=_bad_rank, args=(r, *args)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for p in procs:
        if p.is_alive():
            p.kill()
            pytest.fail("a rank hung")
    ranks = [json.loads((tmp_path / f"bad{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert "crash" not in r, r["crash"]
    assert ranks[0] == ranks[1], ranks
    assert ranks[0]["seen"] == 4 and len(ranks[0]["bad"]) == 1 and "stopped" not in ranks[0], ranks
