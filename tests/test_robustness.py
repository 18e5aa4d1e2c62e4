"""Bad inputs in one table: every error names the file / line / field, has a project error type (a ValueError
subclass) and is raised from project code, never from deep inside torch or numpy. Also: the entry points print one
line instead of a traceback, the bad-sample policies of training, untrusted pickles, absurd configs.

Each ``CASES`` entry builds one bad input under ``tmp`` and returns ``(call, error type, expected substrings)``.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file, save_file
from tiny_assets import make_tone, write_audio
from tiny_checkpoint import write_tiny_checkpoint
from train_fixtures import TINY_OVERRIDES, compose_train, write_processor

import musicflamingo
from musicflamingo import MusicFlamingo, MusicFlamingoConfig
from musicflamingo.audio.io import AudioError
from musicflamingo.checkpoint import CheckpointError
from musicflamingo.data.dataset import BadSampleError, ConversationDataset
from musicflamingo.data.manifest import ManifestError, read_manifest
from musicflamingo.eval import BenchmarkError, EvalConfigError, PredictionsFileError
from musicflamingo.model.config import ConfigError
from musicflamingo.processor import MusicFlamingoProcessor
from musicflamingo.runtime import RuntimeConfigError
from musicflamingo.tokenizer import TokenizerError

ROOT = Path(__file__).resolve().parents[1]
PKG = Path(musicflamingo.__file__).resolve().parent
CONV = [{"role": "user", "content": "<sound>What is this?"}, {"role": "assistant", "content": "A tone."}]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("robust")
    proc = write_processor(root / "proc")
    return {"proc": proc, "ckpt": write_tiny_checkpoint(root / "ckpt")}


# ---------------------------------------------------------------------------------------------- builders
def jsonl(path: Path, *records: dict | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def rec(i: int = 0, audio: Any = "a.wav", conv: list | None = None, **extra: Any) -> dict:
    out = {"id": f"r{i}", "conversations": CONV if conv is None else conv, **extra}
    if audio is not None:
        out["audio"] = audio
    return out


def float_wav(path: Path, x: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, x.astype(np.float32), 16000, subtype="FLOAT")  # float wav keeps NaN/inf
    return path


def edit_ckpt(a: dict, tmp: Path, weights: Callable[[dict], None] | None = None, config: Any = None) -> Path:
    """A copy of the tiny checkpoint with its tensors and/or config.json edited."""
    path = Path(shutil.copytree(a["ckpt"], tmp / "ckpt"))
    if weights is not None:
        sd = load_file(path / "model.safetensors")
        weights(sd)
        save_file(sd, path / "model.safetensors")
    if callable(config):
        cfg = json.loads((path / "config.json").read_text())
        config(cfg)
        (path / "config.json").write_text(json.dumps(cfg))
    elif isinstance(config, str):
        (path / "config.json").write_text(config)
    return path


def manifest_case(expect: list[str], *records: dict | str, fname: str = "train.jsonl"):
    """A manifest holding `records`; read_manifest must raise naming `file:line` and the field (`expect`)."""

    def build(tmp: Path, a: dict) -> tuple[Callable, type, list[str]]:
        path = tmp / fname
        tmp.mkdir(parents=True, exist_ok=True)
        if fname.endswith(".json"):
            path.write_text(records[0])
        else:
            jsonl(path, *records)
        return (lambda: read_manifest(path)), ManifestError, [str(path), *expect]

    return build


def sample_case(make_audio: Callable[[Path], str], audio: Callable[[str], Any] = lambda n: n):
    """A one-record manifest whose audio is bad: dataset[0] must raise BadSampleError with id, file:line, file."""

    def build(tmp: Path, a: dict) -> tuple[Callable, type, list[str]]:
        name = make_audio(tmp)
        path = jsonl(tmp / "train.jsonl", rec(7, audio(name)))
        ds = ConversationDataset(read_manifest(path), MusicFlamingoProcessor.from_pretrained(a["proc"]))
        return (lambda: ds[0]), BadSampleError, ["sample 'r7'", f"{path}:1", name]

    return build


def _garbage(tmp: Path) -> str:
    (tmp / "garbage.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt " + os.urandom(200))
    return "garbage.wav"


def _nonfinite(value: float) -> Callable[[Path], str]:
    def make(tmp: Path) -> str:
        x = make_tone(440.0, 0.5)
        x[123] = value
        float_wav(tmp / "nonfinite.wav", x)
        return "nonfinite.wav"

    return make


def _tone(seconds: float, name: str = "tone.wav") -> Callable[[Path], str]:
    def make(tmp: Path) -> str:
        write_audio(tmp / name, make_tone(440.0, seconds))
        return name

    return make


def _pickle_only(tmp: Path, a: dict) -> tuple[Callable, type, list[str]]:
    path = edit_ckpt(a, tmp)
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(pickle.dumps({"x": 1}))
    return (lambda: MusicFlamingo.from_pretrained(path)), CheckpointError, ["pytorch_model.bin", "refused"]


def _truncated(tmp: Path, a: dict) -> tuple[Callable, type, list[str]]:
    path = edit_ckpt(a, tmp)
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size * 2 // 3])
    return (lambda: MusicFlamingo.from_pretrained(path)), CheckpointError, ["model.safetensors", "truncated"]


def _missing_shard(tmp: Path, a: dict) -> tuple[Callable, type, list[str]]:
    path = tmp / "sharded"
    MusicFlamingo.from_pretrained(a["ckpt"]).save_pretrained(path, max_shard_size="200KB")
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    return (
        (lambda: MusicFlamingo.from_pretrained(path)),
        CheckpointError,
        ["model.safetensors.index.json", shard.name, "missing"],
    )


def _ckpt(weights=None, config=None, expect=(), dtype=None):
    def build(tmp: Path, a: dict) -> tuple[Callable, type, list[str]]:
        path = edit_ckpt(a, tmp, weights, config)
        return (
            (lambda: MusicFlamingo.from_pretrained(path, dtype=dtype)),
            CheckpointError,
            [str(path), *expect],
        )

    return build


def _processor(remove: str = "", write: tuple[str, str] | None = None, expect=(), error=TokenizerError):
    def build(tmp: Path, a: dict) -> tuple[Callable, type, list[str]]:
        path = Path(shutil.copytree(a["proc"], tmp / "proc"))
        if remove:
            (path / remove).unlink()
        if write:
            (path / write[0]).write_text(write[1])
        return (lambda: MusicFlamingoProcessor.from_pretrained(path)), error, [str(path), *expect]

    return build


def _processor_too_short(tmp: Path, a: dict) -> tuple[Callable, type, list[str]]:
    """100 samples: decodable and finite, but fewer than the 3 mel frames one audio token needs."""
    p = MusicFlamingoProcessor.from_pretrained(a["proc"])
    wav = write_audio(tmp / "blip.wav", make_tone(440.0, 100 / 16000))
    conv = [
        [{"role": "user", "content": [{"type": "audio", "path": str(wav)}, {"type": "text", "text": "Hi"}]}]
    ]
    return (lambda: p.apply_chat_template(conv)), AudioError, ["blip.wav", "100 samples", "too short"]


def _eval_missing_benchmark_file(tmp: Path, a: dict) -> tuple[Callable, type, list[str]]:
    from musicflamingo.eval import build_benchmark

    (tmp / "mmau").mkdir()
    cfg = {"name": "mmau", "format": "mmau", "root": str(tmp / "mmau"), "file": "test-mini.json"}
    return (lambda: build_benchmark(cfg)), BenchmarkError, ["test-mini.json"]


def _damaged_predictions(tmp: Path, a: dict) -> tuple[Callable, type, list[str]]:
    from musicflamingo.eval import load_predictions

    path = tmp / "predictions.jsonl"
    path.write_text('{"id": "a", "prediction": "x"}\n{"id": \n{"id": "b", "prediction": "y"}\n')
    return (lambda: load_predictions(path)), PredictionsFileError, ["predictions.jsonl:2"]


def _eval_bad_dtype(tmp: Path, a: dict) -> tuple[Callable, type, list[str]]:
    from musicflamingo.eval import build_predict_fn

    cfg = {"ckpt": str(a["ckpt"]), "device": "cpu", "dtype": "float8"}
    return (lambda: build_predict_fn(cfg)), EvalConfigError, ["dtype='float8'"]


def _infer(
    tmp: Path, a: dict, error: type | None = None, **overrides: Any
) -> tuple[Callable, type, list[str]]:
    from musicflamingo.inference import InferenceError, infer

    audio = write_audio(tmp / "x.wav", make_tone(440.0, 0.5))
    cfg = {"ckpt": str(a["ckpt"]), "audio": str(audio), "device": "cpu", "stream": False, **overrides}
    key = next(iter(overrides))
    return (lambda: infer(cfg)), error or InferenceError, [key]


def _lit(**kwargs: Any):
    def build(tmp: Path, a: dict) -> tuple[Callable, type, list[str]]:
        import functools

        from musicflamingo.lit import MusicFlamingoLit, warmup_cosine
        from musicflamingo.model.build import PARTS, create_model, freeze_parts

        model = create_model("tiny", {"audio": {"max_source_positions": 100}})
        if "freeze" in kwargs:  # the model builder checks what is frozen
            return (lambda: freeze_parts(model, kwargs["freeze"])), ValueError, ["freeze"]
        args = {
            "net": model,
            "optimizer": functools.partial(torch.optim.AdamW, lr=1e-3),
            "scheduler": functools.partial(warmup_cosine, warmup_steps=0, max_steps=10, min_lr_ratio=0.1),
            "part_lr": dict.fromkeys(PARTS),
            "nonfinite_loss": "stop",
        }
        return (lambda: MusicFlamingoLit(**{**args, **kwargs})), ValueError, list(kwargs)

    return build


def _datamodule(expect: str, **kwargs: Any):
    def build(tmp: Path, a: dict) -> tuple[Callable, type, list[str]]:
        from musicflamingo.data.datamodule import MusicFlamingoDataModule

        text_only = {"conversations": [{"role": "user", "content": "Q"}, CONV[1]]}
        args = {"train": str(jsonl(tmp / "x.jsonl", text_only)), "processor": str(a["proc"]), **kwargs}
        return (lambda: MusicFlamingoDataModule(**args).setup("fit")), ValueError, [expect]

    return build


def _preset(expect: list[str], **overrides: Any):
    def build(tmp: Path, a: dict) -> tuple[Callable, type, list[str]]:
        return (lambda: MusicFlamingoConfig.from_name("tiny", **overrides)), ConfigError, expect

    return build


def _pop(name: str) -> Callable[[dict], None]:
    return lambda sd: sd.pop(name)


def _put(name: str, value: torch.Tensor) -> Callable[[dict], None]:
    return lambda sd: sd.__setitem__(name, value)


def _set(*path_value: Any) -> Callable[[dict], None]:
    *keys, value = path_value

    def edit(cfg: dict) -> None:
        d = cfg
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value

    return edit


PROJ_B = "multi_modal_projector.linear_1.bias"
CASES: dict[str, Callable[[Path, dict], tuple[Callable, type, list[str]]]] = {
    # manifests: file:line and the field
    "malformed_jsonl_line": manifest_case(
        [":2:", "malformed JSON"], rec(0), '{"id": "r1", "conversations": [', rec(2)
    ),
    "no_conversations": manifest_case([":1:", "'conversations'"], {"id": "r0", "audio": "a.wav"}),
    "conversations_not_a_list": manifest_case([":1:", "'conversations' must be a list"], rec(0, conv="hi")),
    "unknown_role": manifest_case(
        [":1:", "conversations[0].role", "'robot'"],
        rec(0, conv=[{"role": "robot", "content": "<sound>x"}, CONV[1]]),
    ),
    "unknown_af3_role": manifest_case(
        [":1:", "conversations[0].from", "'bot'"],
        {
            "sound": "a.wav",
            "conversations": [{"from": "bot", "value": "<sound>x"}, {"from": "gpt", "value": "y"}],
        },
    ),
    "sound_count_mismatch": manifest_case(
        [":1:", "1 '<sound>'", "2 audio(s) in 'audio'"], rec(0, audio=["a.wav", "b.wav"])
    ),
    "audio_wrong_type": manifest_case([":1:", "field 'audio'", "got int"], rec(0, audio=5)),
    "content_wrong_type": manifest_case(
        [":1:", "conversations[1].content", "string"],
        rec(0, conv=[CONV[0], {"role": "assistant", "content": 3}]),
    ),
    "id_wrong_type": manifest_case([":2:", "field 'id'"], rec(0), rec(1, id=[1, 2])),
    "negative_offset": manifest_case(
        [":1:", "'audio.offset'"], rec(0, audio={"path": "a.wav", "offset": -1})
    ),
    "unknown_audio_key": manifest_case(
        [":1:", "'audio'", "'start'"], rec(0, audio={"path": "a.wav", "start": 1})
    ),
    "last_turn_not_assistant": manifest_case([":1:", "'conversations'", "assistant"], rec(0, conv=CONV[:1])),
    "special_token_in_text": manifest_case(
        [":1:", "conversations[1].content", "<|im_end|>"],
        rec(0, conv=[CONV[0], {"role": "assistant", "content": "a<|im_end|>b"}]),
    ),
    "json_list_missing_comma": manifest_case(
        [":3:", "expected ','"], '[\n{"conversations": []}\n{"x": 1}\n]', fname="train.json"
    ),
    "empty_manifest": manifest_case(["no records"], ""),
    # audio of a training sample: sample id, manifest:line and the audio file
    "audio_missing": sample_case(lambda tmp: "nope.wav"),
    "audio_undecodable": sample_case(_garbage),
    "audio_is_a_folder": sample_case(lambda tmp: (tmp / "dir.wav").mkdir() or "dir.wav"),
    "audio_empty": sample_case(lambda tmp: float_wav(tmp / "empty.wav", np.zeros(0)).name),
    "audio_shorter_than_a_mel_frame": sample_case(_tone(100 / 16000, "short.wav")),
    "audio_nan": sample_case(_nonfinite(float("nan"))),
    "audio_inf": sample_case(_nonfinite(float("inf"))),
    "audio_offset_past_end": sample_case(_tone(0.5), lambda n: {"path": n, "offset": 2.0}),
    "processor_audio_too_short_for_a_token": _processor_too_short,
    # checkpoints: the folder / file and the key
    "ckpt_no_config_json": lambda tmp, a: (
        lambda p: ((lambda: MusicFlamingo.from_pretrained(p)), CheckpointError, [str(p), "no config.json"])
    )(Path(shutil.copytree(a["ckpt"], tmp / "c", ignore=shutil.ignore_patterns("config.json")))),
    "ckpt_unknown_model_type": _ckpt(config=_set("model_type", "llama"), expect=["config.json", "'llama'"]),
    "ckpt_config_not_json": _ckpt(config="{not json", expect=["config.json", "not valid JSON"]),
    "ckpt_config_wrong_type": _ckpt(
        config=_set("audio_config", "hidden_size", "64"), expect=["config.json", "audio_config.hidden_size"]
    ),
    "ckpt_absurd_vocab": _ckpt(
        config=_set("text_config", "vocab_size", 10**12), expect=["config.json", "text_config.vocab_size"]
    ),
    "ckpt_missing_tensor": _ckpt(_pop("audio_tower.layers.1.fc2.bias"), expect=["missing keys", "fc2.bias"]),
    "ckpt_unexpected_tensor": _ckpt(
        _put("extra.weight", torch.zeros(2)), expect=["unexpected", "extra.weight"]
    ),
    "ckpt_wrong_shape": _ckpt(_put(PROJ_B, torch.zeros(7)), expect=["wrong shapes", PROJ_B, "[7]"]),
    "ckpt_truncated_safetensors": _truncated,
    "ckpt_missing_shard": _missing_shard,
    "ckpt_pickle_only": _pickle_only,
    "ckpt_bad_dtype_string": lambda tmp, a: (
        (lambda: MusicFlamingo.from_pretrained(a["ckpt"], dtype="float8")),
        ValueError,
        ["dtype", "'float8'"],
    ),
    "preset_unknown_field": _preset(["text config", "hiden_size"], text={"hiden_size": 64}),
    "preset_heads_mismatch": _preset(["text_config.num_attention_heads"], text={"num_key_value_heads": 3}),
    # processor folders
    "processor_without_tokenizer": _processor(remove="tokenizer.json", expect=["no tokenizer.json"]),
    "processor_config_not_json": _processor(
        write=("processor_config.json", "{oops"),
        expect=["processor_config.json", "invalid JSON"],
        error=ValueError,
    ),
    # inference / evaluation / training settings
    "infer_negative_max_new_tokens": lambda tmp, a: _infer(tmp, a, max_new_tokens=-5),
    "infer_bad_top_p": lambda tmp, a: _infer(tmp, a, top_p=1.5),
    "infer_bad_dtype": lambda tmp, a: _infer(tmp, a, RuntimeConfigError, dtype="int3"),
    "eval_bad_dtype": _eval_bad_dtype,
    "eval_missing_benchmark_file": _eval_missing_benchmark_file,
    "eval_damaged_predictions": _damaged_predictions,
    "train_bad_nonfinite_policy": _lit(nonfinite_loss="ignore"),
    "train_unknown_frozen_part": _lit(freeze={"decoder": True}),
    "data_bad_sample_policy": _datamodule("bad_sample_policy", bad_sample_policy="ignore"),
    "data_negative_weight": _datamodule("train[0].weight", train=[{"path": "x.jsonl", "weight": -1}]),
    "data_bad_max_bad_fraction": _datamodule("max_bad_fraction", max_bad_fraction=2.0),
}


def assert_clean_error(call: Callable[[], Any], error: type, expected: list[str]) -> BaseException:
    """`call()` raises `error` (a ValueError from project code) whose message contains every `expected` part."""
    with pytest.raises(ValueError) as info:
        call()
    e = info.value
    assert isinstance(e, error), f"{type(e).__module__}.{type(e).__name__}: {e}"
    assert type(e) is ValueError or type(e).__module__.startswith("musicflamingo."), type(e)
    last = Path(traceback.extract_tb(e.__traceback__)[-1].filename).resolve()
    assert last.is_relative_to(PKG), f"raised from {last}, not from project code: {e}"
    for part in expected:
        assert part in str(e), f"{part!r} not in message: {e}"
    return e


def test_table_has_every_kind_of_bad_input():
    assert len(CASES) >= 25


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_gives_clear_error(name, assets, tmp_path):
    call, error, expected = CASES[name](tmp_path, assets)
    assert_clean_error(call, error, expected)


# ---------------------------------------------------------------------------------------------- entry points
def _run(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )


def test_train_cli_unknown_config_key_is_one_clear_message(tmp_path):
    out = _run([str(ROOT / "train.py"), "model.nonexistent=1", f"hydra.run.dir={tmp_path / 'run'}"], ROOT)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr + out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: model.nonexistent=1: no setting model.nonexistent; model takes:"
    ), out.stderr
    assert not (tmp_path / "run").exists()


def test_train_cli_bad_manifest_is_one_line(tmp_path, assets):
    bad = jsonl(tmp_path / "train.jsonl", rec(0), '{"id": "r1", "conversations": [')
    args = [f"data.train={bad}", f"data.processor={assets['proc']}", f"hydra.run.dir={tmp_path / 'run'}"]
    args.append(f"+model.net.overrides={TINY_OVERRIDES}")
    out = _run(
        [str(ROOT / "train.py"), *args, "hydra/job_logging=none", "hydra/hydra_logging=none"], tmp_path
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(f"error: {bad}:2: malformed JSON")


@pytest.mark.parametrize("entry", ["eval", "infer"])
def test_eval_and_infer_cli_truncated_checkpoint_is_one_line(entry, assets, tmp_path):
    ckpt = Path(shutil.copytree(assets["ckpt"], tmp_path / "ckpt"))
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:4096])
    audio = write_audio(tmp_path / "a.wav", make_tone(440.0, 0.5))
    if entry == "eval":
        jsonl(
            tmp_path / "bench" / "test.jsonl",
            {"id": "q", "task": "caption", "audio": str(audio), "conversations": CONV},
        )
        args = [
            "benchmark=synthetic",
            f"benchmark.root={tmp_path / 'bench'}",
            f"output_dir={tmp_path / 'out'}",
        ]
        args += ["device=cpu", "progress=false"]
    else:
        args = [f"audio={audio}", "device=cpu"]
    out = _run([str(ROOT / f"{entry}.py"), f"ckpt={ckpt}", *args], tmp_path)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert "error:" in last and "model.safetensors" in last and "truncated" in last, out.stderr[-2000:]


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.train=???", "error: data.train is not set: pass data.train=... on the command line"),
        (
            "model.net.preset=huge",
            "error: unknown model preset 'huge'",
        ),  # through Hydra's InstantiationException
        ("model.nonfinite_loss=bogus", "error: model.nonfinite_loss='bogus': expected 'stop' or 'skip'"),
        ("data.processor=/no/such/dir", "error: data.processor='/no/such/dir': no such folder"),
    ],
)
def test_run_cli_turns_config_errors_into_one_line(override, message, assets, tmp_path, capsys):
    """What `python train.py <override>` prints (run in-process: train.py is `run_cli(lambda: train(cfg))`)."""
    from omegaconf import open_dict

    from musicflamingo.cli import run_cli
    from musicflamingo.training import train

    key, value = override.split("=", 1)
    (tmp_path / "x.jsonl").touch()  # a manifest that exists: settings refuse a missing one first
    cfg = compose_train(tmp_path, tmp_path / "x.jsonl", assets["proc"], [] if value == "???" else [override])
    if value == "???":
        with open_dict(cfg):
            cfg.data.train = "???"
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: train(cfg))
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and err[0].startswith(message), err


def test_error_from_a_dataloader_worker_prints_the_original_reason(assets, tmp_path):
    from torch.utils.data import DataLoader

    from musicflamingo.cli import error_line

    path = jsonl(tmp_path / "train.jsonl", rec(3, "missing.wav"))
    ds = ConversationDataset(read_manifest(path), MusicFlamingoProcessor.from_pretrained(assets["proc"]))
    loader = DataLoader(ds, batch_size=None, num_workers=1, multiprocessing_context="fork")
    with pytest.raises(BadSampleError) as info:
        next(iter(loader))
    assert "DataLoader worker" in str(info.value)  # torch wraps the message in the worker's traceback
    assert (
        error_line(info.value) == f"sample 'r3' ({path}:1): {tmp_path / 'missing.wav'}: audio file not found"
    )


# ---------------------------------------------------------------------------------------------- bad samples
def _dataset_with_corrupt_files(root: Path, n: int = 20) -> tuple[Path, dict[str, str]]:
    """n one-clip records; r5 is undecodable and r13 has a NaN sample. Returns (manifest, {bad id: file})."""
    root.mkdir(parents=True, exist_ok=True)
    bad = {"r5": "corrupt.wav", "r13": "nan.wav"}
    records = []
    for i in range(n):
        name = bad.get(f"r{i}", f"clip{i}.wav")
        if i not in (5, 13):
            write_audio(root / name, make_tone([220.0, 440.0, 880.0][i % 3], 1.0 + 0.25 * (i % 3)))
        records.append(rec(i, name, [CONV[0], {"role": "assistant", "content": f"tone {i % 3}"}]))
    (root / "corrupt.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x01" * 64)
    nan = make_tone(440.0, 1.0)
    nan[4000] = np.nan
    float_wav(root / "nan.wav", nan)
    return jsonl(root / "train.jsonl", *records), bad


def test_skip_policy_trains_to_the_end_and_reports_exactly_the_corrupt_files(assets, tmp_path, caplog):
    from musicflamingo.training import train

    manifest, bad = _dataset_with_corrupt_files(tmp_path / "data")
    ds = ConversationDataset(read_manifest(manifest), MusicFlamingoProcessor.from_pretrained(assets["proc"]))
    budget = max(ds.estimate_lengths())  # one sample per batch: the corrupt ones come as all-bad batches
    cfg = compose_train(
        tmp_path,
        manifest,
        assets["proc"],
        [
            "data.bad_sample_policy=skip",
            "data.max_bad_fraction=0.2",  # 10% corrupt: below it (applies after BadSampleTracker.min_seen=100)
            f"data.batch_max_tokens={budget}",
            "trainer.max_steps=-1",
            "trainer.max_epochs=1",
            "model.scheduler.max_steps=20",
            "trainer.log_every_n_steps=1",
            "export=false",
            "threads=1",
        ],
    )
    with caplog.at_level(logging.WARNING):
        _, obj = train(cfg)
    trainer = obj["trainer"]
    assert trainer.state.status == "finished" and trainer.current_epoch == 1
    # One sample per batch: 20 optimizer steps, the 2 all-bad batches included (Lightning still counts a step
    # whose training_step returned None; no gradient, so no update).
    assert trainer.global_step == 20
    run = tmp_path / "run"
    rows = [json.loads(x) for x in (run / "bad_samples.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(bad)
    for r in rows:
        line = int(r["id"][1:]) + 1
        assert r["source"] == f"{manifest}:{line}" and bad[r["id"]] in r["reason"]
    summary = json.loads((run / "bad_samples.summary.json").read_text())
    assert summary == {"bad": 2, "seen": 20, "fraction": 0.1}
    assert "skipped 2 of 20 training samples" in caplog.text
    assert all(f"skipping bad sample {i!r}" in caplog.text for i in bad)
    logged = [r["train/bad_samples"] for r in _csv_rows(run) if r.get("train/bad_samples")]
    assert float(logged[-1]) == 2.0


def _csv_rows(run: Path) -> list[dict[str, str]]:
    import csv

    with open(run / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_error_policy_stops_at_the_first_corrupt_file_by_name(assets, tmp_path):
    from musicflamingo.training import train

    manifest, bad = _dataset_with_corrupt_files(tmp_path / "data")
    cfg = compose_train(
        tmp_path, manifest, assets["proc"], ["trainer.max_steps=40", "export=false", "threads=1"]
    )
    with pytest.raises(BadSampleError) as info:
        train(cfg)
    msg = str(info.value)
    hit = [i for i in bad if f"sample {i!r}" in msg]
    assert len(hit) == 1 and bad[hit[0]] in msg and f"{manifest}:{int(hit[0][1:]) + 1}" in msg, msg
    assert (tmp_path / "run" / "bad_samples.jsonl").read_text() == ""  # error policy: nothing was skipped


# ---------------------------------------------------------------------------------------------- untrusted files
class _Payload:
    """Pickling this creates `marker` when (and only when) the pickle is executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("kind", ["torch_save", "raw_pickle"])
def test_malicious_last_ckpt_is_refused_without_running(kind, assets, tmp_path):
    from musicflamingo.training import train

    manifest, _ = _dataset_with_corrupt_files(tmp_path / "data", n=3)
    marker = tmp_path / "pwned"
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    payload = {"state_dict": {}, "evil": _Payload(marker)}
    if kind == "torch_save":
        torch.save(payload, last)
    else:
        last.write_bytes(pickle.dumps(payload))
    cfg = compose_train(tmp_path, manifest, assets["proc"], ["trainer.max_steps=1", "export=false"])
    e = assert_clean_error(lambda: train(cfg), ValueError, [str(last), "weights_only=True"])
    assert "cannot load checkpoint safely" in str(e)
    assert not marker.exists(), "the pickle payload ran"


def test_absurd_configs_refused_before_allocation(assets, tmp_path):
    """In a fresh process (clean peak RSS): configs asking for ~10^12 parameters or a 4 TB tensor are refused
    before anything that size exists."""
    huge = edit_ckpt(assets, tmp_path, config=_set("text_config", "num_hidden_layers", 500))
    cfg = json.loads((huge / "config.json").read_text())
    cfg["text_config"].update(hidden_size=60000, intermediate_size=400000, head_dim=128)
    (huge / "config.json").write_text(json.dumps(cfg))
    bomb = Path(shutil.copytree(assets["ckpt"], tmp_path / "bomb"))
    header = json.dumps({"x": {"dtype": "F32", "shape": [10**12], "data_offsets": [0, 4 * 10**12]}}).encode()
    (bomb / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 64)
    script = f"""
import resource, sys
from musicflamingo import MusicFlamingo, MusicFlamingoConfig
from musicflamingo.model.build import create_model
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
calls = [lambda: MusicFlamingo.from_pretrained({str(huge)!r}), lambda: MusicFlamingo.from_pretrained({str(bomb)!r}),
         lambda: create_model("tiny", {{"text": {{"vocab_size": 3_000_000, "hidden_size": 8192,
                                                 "intermediate_size": 400_000, "num_hidden_layers": 500}}}})]
for call in calls:
    try:
        call()
        print("ALLOCATED")
    except ValueError as e:
        print(type(e).__name__, e)
print("GROWTH_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)
"""
    out = _run(["-c", script], tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert "ALLOCATED" not in out.stdout
    assert lines[0].startswith("CheckpointError") and "parameters, above the limit" in lines[0]
    assert lines[1].startswith("CheckpointError") and "model.safetensors" in lines[1]
    assert lines[2].startswith("ConfigError") and "parameters" in lines[2]
    growth_kb = int(lines[-1].split()[1])
    assert growth_kb < 100_000, f"peak RSS grew by {growth_kb} kB"


def test_cpu_allocator_tuning_applies_on_glibc_and_can_be_turned_off(monkeypatch):
    """`run_cli` keeps freed CPU memory for reuse (glibc mallopt); MUSICFLAMINGO_TUNE_MALLOC=0 leaves glibc alone."""
    import platform

    from musicflamingo.runtime import tune_cpu_allocator

    monkeypatch.setenv("MUSICFLAMINGO_TUNE_MALLOC", "0")
    assert tune_cpu_allocator() is False
    monkeypatch.delenv("MUSICFLAMINGO_TUNE_MALLOC")
    assert tune_cpu_allocator() is (platform.libc_ver()[0] == "glibc")


_ONEDNN_GROWTH = """
import os, sys
import psutil, torch
if sys.argv[1] == "limited":
    from musicflamingo.runtime import limit_onednn_cache
    limit_onednn_cache(64)  # after importing torch, before the first oneDNN primitive, like run_cli
a = torch.randn(64, 256, dtype=torch.bfloat16)
(a @ a.T).sum()
base = psutil.Process().memory_info().rss
for n in range(1, 800):  # 799 matmul shapes, as varying batches or growing prompts produce
    (a @ torch.randn(n, 256, dtype=torch.bfloat16).T).sum()
print((psutil.Process().memory_info().rss - base) // 2**20)
"""


def test_onednn_cache_cap_bounds_memory_of_changing_shapes(monkeypatch):
    """`run_cli` caps both caches of oneDNN primitives (oneDNN's and ideep's): a process meeting hundreds of bf16
    matmul shapes then keeps a bounded number of them; a variable already set wins."""
    from musicflamingo.runtime import ONEDNN_CACHE_CAPACITY, limit_onednn_cache

    names = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
    for name in names:
        monkeypatch.delenv(name, raising=False)
    assert limit_onednn_cache() == str(ONEDNN_CACHE_CAPACITY)
    assert [os.environ[n] for n in names] == [str(ONEDNN_CACHE_CAPACITY)] * 2
    monkeypatch.setenv(names[0], "7")
    monkeypatch.setenv(names[1], "9")
    assert limit_onednn_cache() == "7" and os.environ[names[1]] == "9"
    for name in names:
        monkeypatch.delenv(name)
    env = {k: v for k, v in os.environ.items() if k not in names}
    grown = {}
    for mode in ("default", "limited"):
        out = subprocess.run(
            [sys.executable, "-c", _ONEDNN_GROWTH, mode], capture_output=True, text=True, env=env, timeout=120
        )
        assert out.returncode == 0, out.stderr[-2000:]
        grown[mode] = int(out.stdout.split()[-1])
    if grown["default"] < 100:
        pytest.skip(f"bf16 matmuls do not grow oneDNN's caches here ({grown['default']} MB)")
    # Measured: ~530 MB by default, ~65 MB with both caches at 64; oneDNN's cache alone at 64 kept ~340 MB.
    assert grown["limited"] < 0.3 * grown["default"], grown
