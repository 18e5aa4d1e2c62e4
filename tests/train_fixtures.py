"""Tiny training setups: a processor with 2 s windows, tone clips, manifests, and composed Hydra configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict
from tiny_assets import make_tone, write_audio, write_tiny_tokenizer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CHUNK = 2.0  # seconds per encoder window in the tiny training tests (tiny preset: max_source_positions 100)
TINY_OVERRIDES = "{audio:{max_source_positions:100}}"


def write_processor(dirpath: Path, chunk_length: float = CHUNK) -> Path:
    """The tiny tokenizer's processor with `chunk_length`-second windows (at most 8 s of audio)."""
    from musicflamingo.processor import MusicFlamingoProcessor
    from musicflamingo.tokenizer import load_tokenizer

    dirpath.mkdir(parents=True, exist_ok=True)
    write_tiny_tokenizer(dirpath)
    processor = MusicFlamingoProcessor(load_tokenizer(dirpath), chunk_length=chunk_length, max_audio_len=8.0)
    processor.save_pretrained(dirpath)
    return dirpath


ANSWERS = ["a low hum", "a bright tone", "a middle note", "a very high whistle"]


def write_dataset(root: Path, n: int = 4, layout: str = "ours") -> Path:
    """n tone clips (1.5-3 s) and a manifest whose answers name the tone; `layout` "ours" or "af3"."""
    root.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        freq = [110.0, 440.0, 880.0, 1760.0][i % 4]
        audio = write_audio(root / f"clip{i}.wav", make_tone(freq, 1.5 + 0.5 * (i % 3)))
        answer = ANSWERS[i % 4]
        if layout == "ours":
            records.append(
                {
                    "id": f"c{i}",
                    "audio": audio.name,
                    "conversations": [
                        {"role": "user", "content": "<sound>What is this?"},
                        {"role": "assistant", "content": answer},
                    ],
                }
            )
        else:
            records.append(
                {
                    "id": f"c{i}",
                    "sound": audio.name,
                    "conversations": [
                        {"from": "human", "value": "<sound>\nWhat is this?"},
                        {"from": "gpt", "value": answer},
                    ],
                }
            )
    path = root / ("train.jsonl" if layout == "ours" else "train_af3.json")
    if layout == "ours":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))
    return path


def compose_train(
    tmp: Path, manifest: Path, processor: Path, overrides: list[str] | None = None
) -> DictConfig:
    base = [
        f"data.train={manifest}",
        f"data.processor={processor}",
        f"+model.net.overrides={TINY_OVERRIDES}",
        "data.batch_max_tokens=4096",
        "logger=csv",
        f"paths.output_dir={tmp / 'run'}",
        f"paths.log_dir={tmp / 'logs'}",
    ]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=base + (overrides or []))
    with open_dict(cfg):
        cfg.trainer.enable_progress_bar = False
        cfg.trainer.enable_model_summary = False
    return cfg


def run_fsdp_on_cpu(
    run: Path, processor: Path, manifest: Path, overrides: list[str]
) -> subprocess.CompletedProcess:
    """`train.py trainer=fsdp` on 2 CPU processes (gloo) with the tiny model, logging to CSV into the run folder
    `run` (hydra.run.dir; paths.log_dir beside it); `overrides` come before the data and model settings (the
    precision is one of them). Asserts the run exits 0, showing the end of its output if not."""
    cmd = [
        sys.executable,
        str(CONFIGS.parent / "train.py"),
        "trainer=fsdp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "logger=csv",
        *overrides,
        f"data.train={manifest}",
        f"data.processor={processor}",
        f"+model.net.overrides={TINY_OVERRIDES}",
        f"hydra.run.dir={run}",
        f"paths.log_dir={run.parent / 'logs'}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=CONFIGS.parent, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return out


def grpo_module(net, beta: float = 0.04, **changes):  # noqa: ANN001, ANN201
    """A `GRPOLit` around `net` with small test settings (group of 2, 4 new tokens, think prompts); keyword
    arguments replace its settings (`rollout=`, `loss=`, ...) whole."""
    from functools import partial

    import torch

    from musicflamingo.grpo import GRPOLit
    from musicflamingo.lit import warmup_cosine
    from musicflamingo.rewards import FormatReward

    args = dict(
        net=net,
        optimizer=partial(torch.optim.AdamW, lr=1e-3),
        scheduler=partial(warmup_cosine, warmup_steps=0, max_steps=10, min_lr_ratio=1.0),
        part_lr={"audio_tower": None, "multi_modal_projector": None, "language_model": None},
        nonfinite_loss="stop",
        rewards={"format": FormatReward(), "dropped": None},
        rollout={
            "group_size": 2,
            "max_new_tokens": 4,
            "temperature": 0.7,
            "top_p": 1.0,
            "top_k": 0,
            "slots": None,
        },
        loss={
            "beta": beta,
            "clip_eps": 0.2,
            "updates_per_batch": 1,
            "micro_batch_size": 4,
            "max_grad_norm": 1.0,
        },
        think=True,
        tasks=None,
        reference_dtype=None,
        seed=0,
    )
    args.update(changes)
    return GRPOLit(**args)


def run_in_own_group(cmd: list[str], env: dict[str, str], timeout: float, what: str) -> None:
    """Run `cmd` (a train.py launch) in its own session and assert it exits 0; one that hangs is killed with its
    whole process group (Lightning's second rank is a child of the first) and fails the test naming `what`."""
    import os
    import signal
    import subprocess

    import pytest

    p = subprocess.Popen(
        cmd,
        cwd=CONFIGS.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        _, err = p.communicate()
        pytest.fail(f"{what} hung (killed after {timeout} s): {err[-3000:]}")
    assert p.returncode == 0, err[-4000:]
