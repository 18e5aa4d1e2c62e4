"""Shards (litdata): a manifest written as shards reads back the same samples; 2-process DDP over shards sees each
record once per epoch; a resume in the middle of an epoch over shards continues with the exact next batch."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

pytest.importorskip("litdata")
L = pytest.importorskip("lightning")

from musicflamingo.data.dataset import BadSample, ConversationDataset  # noqa: E402
from musicflamingo.data.manifest import read_manifest  # noqa: E402
from musicflamingo.data.shards import ShardDataset, ShardError, is_shards, write_shards  # noqa: E402
from musicflamingo.processor import MusicFlamingoProcessor  # noqa: E402
from musicflamingo.tokenizer import load_tokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from tiny_assets import make_tone, write_audio, write_tiny_tokenizer  # noqa: E402

CONV = [{"role": "user", "content": "<sound>What is this?"}, {"role": "assistant", "content": "a tone"}]


@pytest.fixture(autouse=True)
def litdata_cache(tmp_path, monkeypatch):
    """litdata's cache (index copies, chunks of remote shards) in tmp_path, not ~/.lightning: the environment for
    processes started later, the module value it was read into for this one and forked ranks and workers."""
    monkeypatch.setenv("LITDATA_CACHE_DIR", str(tmp_path / "litdata_cache"))
    monkeypatch.setattr(
        "litdata.utilities.dataset_utilities._LITDATA_CACHE_DIR",
        str(tmp_path / "litdata_cache"),
        raising=False,
    )


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    tok = load_tokenizer(write_tiny_tokenizer(tmp_path_factory.mktemp("tok")))
    return MusicFlamingoProcessor(tok, chunk_length=1.0, max_audio_len=4.0)  # 1 s windows: tiny log-mels


def _line(rid, audio, conv=CONV):
    return json.dumps({"id": rid, "audio": audio, "conversations": conv})


def _mixed_manifest(d: Path) -> Path:
    """flac and wav clips, a segment, two audios in one record, text only, and bad files of each kind."""
    write_audio(d / "a.flac", make_tone(220, 1.3))
    write_audio(d / "b.wav", make_tone(660, 2.6))
    sf.write(d / "nan.wav", np.full(8000, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    (d / "corrupt.wav").write_bytes(b"RIFF\x00\x01garbage" * 10)
    two = [{"role": "user", "content": "<sound><sound>Same?"}, {"role": "assistant", "content": "no"}]
    text = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    lines = [
        _line("flac", "a.flac"),
        _line("segment", {"path": "b.wav", "offset": 0.7, "duration": 1.2}),
        _line("two", ["a.flac", "b.wav"], two),
        json.dumps({"id": "text", "conversations": text, "meta": {"k": 1}}),
        _line("missing", "gone.wav"),
        _line("nan", "nan.wav"),
        _line("corrupt", "corrupt.wav"),
    ]
    (d / "m.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return d / "m.jsonl"


def _same_sample(a, b):
    if isinstance(a, BadSample):
        assert isinstance(b, BadSample) and (a.index, a.id, a.source) == (b.index, b.id, b.source)
        return
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_shards_read_back_the_manifest_samples(processor, tmp_path):
    manifest = _mixed_manifest(tmp_path / "data")
    out = tmp_path / "shards"
    from musicflamingo.data.__main__ import main

    main(["shard", str(manifest), str(out), "--workers", "2", "--chunk-bytes", "20kB"])
    assert is_shards(out) and not is_shards(manifest) and is_shards("s3://bucket/train")
    assert len(list(out.glob("chunk-*.bin"))) > 1  # several chunks, read across
    files = ConversationDataset(read_manifest(manifest), processor, bad_sample_policy="skip")
    lengths = files.estimate_lengths()
    want = [files[i] for i in range(len(files))]
    assert want[2]["input_features"].shape[0] == 2 + 3  # two audios: 1.3 s -> 2 windows, 2.6 s -> 3
    (tmp_path / "data").rename(tmp_path / "gone")  # from here on, the audio exists only in the shards

    local = ShardDataset(out, processor, bad_sample_policy="skip")
    # the object-store code path (index download, ranged reads of single samples) on a local folder
    remote = ShardDataset(
        f"local:{out}", processor, cache_dir=str(tmp_path / "cache"), bad_sample_policy="skip"
    )
    assert local.estimate_lengths() == lengths == remote.estimate_lengths()
    assert [r.id for r in local.records] == [r.id for r in files.records]
    assert local.records[3].extra == {"meta": {"k": 1}}
    for i in [6, 0, 3, 1, 5, 2, 4]:  # out of order: random access
        _same_sample(want[i], local[i])
        _same_sample(want[i], remote[i])
    bad = {i: local[i] for i in (4, 5, 6)}
    assert all(isinstance(b, BadSample) for b in bad.values())
    assert "missing or empty when the shards were written" in bad[4].reason
    assert "non-finite" in bad[5].reason and "cannot decode" in bad[6].reason
    assert bad[4].source == f"{manifest}:5"  # errors still name the manifest line

    with pytest.raises(ShardError, match="already holds shards"):
        write_shards(tmp_path / "gone" / "m.jsonl", str(out))
    with pytest.raises(ShardError, match="not a readable shard folder"):
        ShardDataset(tmp_path / "gone", processor)


def test_an_overwrite_stopped_between_the_halves_keeps_the_old_set(processor, tmp_path, monkeypatch):
    """`--overwrite` stopped after the audio half: the old records/ once stayed beside the new audio (every sample
    the new audio with the old text, no error), then the old set was deleted before the new one was complete; now
    the new set is written beside the old one and swapped in at the end, so the old set reads back as it was. Where
    the halves cannot be swapped (a URL), halves of different runs with different counts name the mismatch instead
    of failing inside litdata."""
    import shutil

    import litdata

    old, new = _even_manifest(tmp_path / "a", 6, "a"), _even_manifest(tmp_path / "b", 4, "b")
    out = tmp_path / "shards"
    write_shards(old, str(out))
    real, calls = litdata.optimize, []

    def stopped(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the records half
            raise KeyboardInterrupt("stopped between the halves")
        return real(*args, **kwargs)

    monkeypatch.setattr(litdata, "optimize", stopped)
    with pytest.raises(KeyboardInterrupt):
        write_shards(new, str(out), overwrite=True)
    monkeypatch.setattr(litdata, "optimize", real)
    kept = ShardDataset(out, processor)
    assert [kept.records[i].id for i in range(len(kept))] == [f"a{i}" for i in range(6)]
    assert not (out / ".overwrite-staging").exists()
    assert write_shards(new, str(out), overwrite=True) == 4  # a complete overwrite replaces every shard file
    swapped = ShardDataset(out, processor)
    assert [swapped.records[i].id for i in range(len(swapped))] == [f"b{i}" for i in range(4)]
    assert not (out / ".overwrite-staging").exists()

    shutil.rmtree(out)
    write_shards(new, str(out))  # the audio half of 4 records ...
    shutil.rmtree(out / "records")
    write_shards(old, str(tmp_path / "other"))
    shutil.copytree(tmp_path / "other" / "records", out / "records")  # ... beside the records of 6
    mixed = ShardDataset(out, processor)
    with pytest.raises(ShardError, match="no audio sample 5 for its 6 records.*written by different runs"):
        mixed[5]

    with pytest.raises(ShardError, match=r"chunk_bytes='12XB': expected a size such as 64MB"):
        write_shards(old, str(tmp_path / "c"), chunk_bytes="12XB")
    assert not (tmp_path / "c").exists()  # refused before anything was read or written


def _even_manifest(d: Path, n: int, prefix: str = "c") -> Path:
    """n records of equal token length (1 s clips, one-digit answers), ids `<prefix><i>`."""
    d.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        write_audio(d / f"c{i}.wav", make_tone(110.0 * (1 + i), 1.0))
        conv = [CONV[0], {"role": "assistant", "content": f"tone {i % 10}"}]
        lines.append(_line(f"{prefix}{i}", f"c{i}.wav", conv))
    (d / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return d / "train.jsonl"


class Recorder(L.LightningModule):
    """Keeps (epoch, record ids) of every training batch; writes them per rank to `out` at the end."""

    def __init__(self, out=None):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.out, self.seen = out, []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, tuple(batch["ids"])))
        return (self.w * batch["input_ids"].float().mean()).sum()

    def on_train_end(self):
        if self.out is not None:
            Path(self.out, f"rank{self.global_rank}.json").write_text(json.dumps(self.seen))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _trainer(tmp_path, **kwargs):
    return L.Trainer(
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
        **kwargs,
    )


@pytest.mark.timeout(300)
def test_two_process_ddp_over_shards_sees_each_record_once_per_epoch(processor, tmp_path):
    from musicflamingo.data.datamodule import MusicFlamingoDataModule

    n = 12
    write_shards(_even_manifest(tmp_path / "data", n), str(tmp_path / "shards"))
    one = ShardDataset(tmp_path / "shards", processor).estimate_lengths()
    assert len(set(one)) == 1  # equal lengths: 2 per batch, 6 batches, 3 per rank and epoch
    dm = MusicFlamingoDataModule(
        train=str(tmp_path / "shards"),
        processor=processor,
        batch_max_tokens=2 * one[0],
        num_workers=1,
        seed=3,
    )
    trainer = _trainer(
        tmp_path,
        max_epochs=2,
        strategy="ddp_fork",  # ranks forked from this process: no torch and Lightning import each (~17 s CPU)
        devices=2,
        use_distributed_sampler=False,
        enable_checkpointing=False,
    )
    trainer.fit(Recorder(out=str(tmp_path)), datamodule=dm)
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    everyone = [f"c{i}" for i in range(n)]
    for epoch in range(2):
        ids = [[i for e, batch in rank for i in batch if e == epoch] for rank in seen]
        assert len(ids[0]) == len(ids[1]) == n // 2
        assert not set(ids[0]) & set(ids[1])  # disjoint halves
        assert sorted(ids[0] + ids[1]) == sorted(everyone)  # together: every record exactly once
    order = [[b for e, b in rank] for rank in seen]
    assert order[0][:3] != order[0][3:]  # each epoch its own order


def test_resume_mid_epoch_from_shards_gives_the_next_batch(processor, tmp_path):
    """A mixture of two shard sets (weights 1 and 0.5, one read through the object-store path): a run stopped in
    the middle of epoch 1 and resumed from its checkpoint trains on the batches the uninterrupted run did."""
    from musicflamingo.data.datamodule import MusicFlamingoDataModule

    write_shards(_even_manifest(tmp_path / "a", 8, "a"), str(tmp_path / "sa"))
    write_shards(_even_manifest(tmp_path / "b", 6, "b"), str(tmp_path / "sb"))
    train = [
        {"path": str(tmp_path / "sa"), "weight": 1.0},
        {"path": f"local:{tmp_path / 'sb'}", "weight": 0.5},
    ]
    budget = 2 * ShardDataset(tmp_path / "sa", processor).estimate_lengths()[0]

    def datamodule():
        return MusicFlamingoDataModule(
            train=train, processor=processor, batch_max_tokens=budget, num_workers=1
        )

    def run(ckpt_path=None, save_every=None):
        model, callbacks = Recorder(), []
        if save_every:
            callbacks.append(
                L.pytorch.callbacks.ModelCheckpoint(
                    dirpath=tmp_path / "ckpt",
                    every_n_train_steps=save_every,
                    save_top_k=-1,
                    filename="{step}",
                )
            )
        trainer = _trainer(tmp_path, max_epochs=2, callbacks=callbacks, enable_checkpointing=bool(save_every))
        trainer.fit(model, datamodule=datamodule(), ckpt_path=ckpt_path)
        return model

    dm = datamodule()
    dm.setup("fit")
    per_epoch = len(dm.train_sampler)
    assert per_epoch == 6  # (8 + 3 samples) / 2 per batch
    stop = per_epoch + 3  # the middle of epoch 1
    full = run(save_every=stop)
    assert len(full.seen) == 2 * per_epoch
    epoch0 = [i for e, b in full.seen if e == 0 for i in b]
    assert sum(i.startswith("a") for i in epoch0) == 8 and sum(i.startswith("b") for i in epoch0) == 3
    assert full.seen[:per_epoch] != full.seen[per_epoch:]
    resumed = run(ckpt_path=tmp_path / "ckpt" / f"step={stop}.ckpt")
    assert resumed.seen == full.seen[stop:]


def test_loader_benchmark_runs_at_the_smallest_size(tmp_path):
    """bench/data_loader.py end to end on 16 clips (the harness, not the speed)."""
    pytest.importorskip("webdataset")
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "data_loader.py"
    spec = importlib.util.spec_from_file_location("bench_data_loader", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "r.json"
    args = ["--clips", "16", "--workers", "0", "--samples", "6", "--repeats", "1", "--no-step"]
    bench.main([*args, "--dir", str(tmp_path), "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert {"files", "litdata shards, local", "webdataset tars, in order"} <= set(rows)
    assert all(r["samples_s"] > 0 for r in rows.values())
    assert rows["files"]["audio_h_s"] > 0


def test_writing_shards_deletes_no_other_files(processor, tmp_path):
    """litdata's writer deletes every *.bin and *index.json file in the folders it writes, and --overwrite removed
    all of records/: a folder holding such files of the user's used to lose them without a word. Now it is refused
    before anything is read; other files stay and shards are written beside them."""
    manifest = _even_manifest(tmp_path / "data", 2)
    out = tmp_path / "mine"
    (out / "records").mkdir(parents=True)
    (out / "features.bin").write_bytes(b"precious")
    (out / "records" / "song.wav").write_bytes(b"precious")
    (out / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(
            ShardError, match=r"mine: holds files that are not shards \(.*features\.bin, \.\.\.\)"
        ):
            write_shards(manifest, str(out), overwrite=overwrite)
    assert (out / "features.bin").read_bytes() == (out / "records" / "song.wav").read_bytes() == b"precious"
    (out / "features.bin").unlink()
    with pytest.raises(ShardError, match=r"not shards \(.*records/song\.wav\)"):
        write_shards(manifest, str(out), overwrite=True)
    assert (out / "records" / "song.wav").read_bytes() == b"precious"
    (out / "records" / "song.wav").unlink()
    assert write_shards(manifest, str(out)) == 2  # other files are kept
    assert (out / "notes.txt").read_text() == "mine" and len(ShardDataset(out, processor)) == 2

    (out / "records" / "index.json").unlink()  # as a write stopped in the records half leaves it
    with pytest.raises(ShardError, match="incomplete shard set .*write it again with --overwrite"):
        write_shards(manifest, str(out))
    with pytest.raises(ShardError) as e:
        ShardDataset(out, processor)
    assert "\n" not in str(e.value) and str(e.value).endswith("`python -m musicflamingo.data shard`")
    assert write_shards(manifest, str(out), overwrite=True) == 2
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ShardError, match="afile: not a folder"):
        write_shards(manifest, str(tmp_path / "afile"))


def test_shard_command_arguments_and_audio_paths(tmp_path, capsys, caplog):
    """A number of bytes (what the help promises) was refused from the command line; negative --workers ran with
    one; an --audio-root that is no folder, or a manifest none of whose files exists, wrote a whole shard set of
    bad samples with exit status 0."""
    from musicflamingo.data.__main__ import main

    manifest = _even_manifest(tmp_path / "data", 3)
    main(["shard", str(manifest), str(tmp_path / "a"), "--chunk-bytes", "100000"])
    assert json.loads(capsys.readouterr().out) == {"records": 3, "shards": str(tmp_path / "a")}

    def refused(*args):
        with pytest.raises(SystemExit) as e:
            main(["shard", *args])
        return e.value.code, capsys.readouterr().err.strip()

    code, err = refused(str(manifest), str(tmp_path / "b"), "--workers", "-2")
    assert code == 2 and err == "error: workers=-2: expected a number of processes >= 0 (0 or 1: one)"
    code, err = refused(str(manifest), str(tmp_path / "b"), "--audio-root", str(tmp_path / "nowhere"))
    assert code == 2 and err.endswith("nowhere: not a folder (relative audio paths resolve against it)")
    moved = tmp_path / "elsewhere.jsonl"
    moved.write_text(manifest.read_text())  # relative paths, away from their audio
    code, err = refused(str(moved), str(tmp_path / "b"))
    assert code == 2 and f"none of its 3 audio files exists (first: {tmp_path / 'c0.wav'}, {moved}:1)" in err
    assert not (tmp_path / "b").exists()
    main(["shard", str(moved), str(tmp_path / "b"), "--audio-root", str(tmp_path / "data")])
    (tmp_path / "data" / "c1.wav").unlink()
    with caplog.at_level("WARNING"):
        write_shards(manifest, str(tmp_path / "c"))
    assert f"1 audio file(s) not found (first: {tmp_path / 'data' / 'c1.wav'}, {manifest}:2)" in caplog.text


STOP_SCRIPT = """
import os, signal, sys, time
import musicflamingo.data.shards as shards
real = shards._audio_item
def slow(item):
    with open(os.environ["PIDS"], "a") as f:
        f.write(f"{os.getpid()}\\n")
    if item[0] == 2:
        os.kill(os.getppid(), signal.SIGINT)  # Ctrl-C on the command
    time.sleep(0.05)
    return real(item)
shards._audio_item = slow
from musicflamingo.data.__main__ import main
main(sys.argv[1:])
"""


@pytest.mark.timeout(120)
def test_ctrl_c_stops_a_shard_write_with_status_130(tmp_path):
    """litdata's SIGINT handler ends the process with os._exit(0): an interrupted write exited 0, its workers kept
    writing chunks after the command had returned, and the handler stayed installed after write_shards."""
    import contextlib
    import os
    import signal
    import subprocess
    import time

    manifest = _even_manifest(tmp_path / "data", 40)
    out, pids, log = tmp_path / "shards", tmp_path / "pids", tmp_path / "log"
    env = {**os.environ, "PIDS": str(pids), "OMP_NUM_THREADS": "1"}
    args = ["shard", str(manifest), str(out), "--workers", "2"]
    with open(log, "w") as f:  # a file, not a pipe: a worker left running would hold a pipe open
        proc = subprocess.Popen(
            [sys.executable, "-c", STOP_SCRIPT, *args], env=env, stdout=f, stderr=f, start_new_session=True
        )
    try:
        rc = proc.wait(timeout=100)
        time.sleep(0.5)
        running = []
        # the workers: none left running (a zombie writes nothing)
        for pid in {int(p) for p in pids.read_text().split()}:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except FileNotFoundError:
                continue
            if state != "Z":
                running.append(pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever the run left behind
    assert rc == 130, log.read_text()[-2000:]
    assert "the shards there are incomplete: write them again with --overwrite" in log.read_text()
    assert not (out / "index.json").exists() and not running

    before = signal.getsignal(signal.SIGINT)
    assert write_shards(manifest, str(tmp_path / "again")) == 40
    assert signal.getsignal(signal.SIGINT) is before  # Ctrl-C after a write is Ctrl-C again
