"""The docs are true: what README.md and docs/*.md tell a reader to type still works with the code and configs.

* Every `python train.py|eval.py|infer.py|serve.py ...` command in a code block (fenced or indented) or an inline
  code span (also `infer.py think=true` without `python`) is composed with the project's configs through Hydra's
  compose API (struct mode: a renamed key or config group fails), resolved, and checked by the entry point's
  settings validator (`musicflamingo.settings`, `check_benchmark_keys`, `ServeSettings.from_cfg` for serve.py).
* Mechanical claims: every `make <target>` exists in the Makefile; every repository path, test name, command-line
  flag, `benchmark.<key>` and `model.|data.|trainer.|callbacks.|logger.` setting named exists; README's config
  table lists each group's YAML files; the benchmark lists, the debug presets, serving.md's defaults table and
  evaluation.md's plot names match the configs and code.

Placeholders in commands (`DIR`, `<think-SFT export>`, `/data/mmau`, `[limit=N]`, `...`) are filled with dummy
values: only keys, config groups and option values are checked, never files.

Marker: a command written to show an error carries the HTML comment `<!-- docs-test: skip -->` (invisible when
rendered) on its own source line or the line above (for a code block: the line above its opening fence, or above the
blank line before an indented block). Such a command is not expected to pass: the test asserts that it is refused,
so the marker cannot hide a command that works (or an error the docs describe that is no longer one).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP_MARKER = "<!-- docs-test: skip -->"
ENTRY_POINTS = ("train", "eval", "infer", "serve")


@dataclass(frozen=True)
class DocCommand:
    where: str  # file:line
    script: str  # train | eval | infer | serve
    args: tuple[str, ...]
    skip: bool
    text: str

    def __str__(self) -> str:
        return f"{self.where}: {self.text}"


# ------------------------------------------------------------------------------------------------ extraction
def _code_blocks(text: str) -> list[tuple[int, str, bool]]:
    """(first line number, block text, marked) of every fenced (```) and indented (4 spaces after a blank line,
    outside lists) code block."""
    lines = text.splitlines()
    blocks: list[tuple[int, str, bool]] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            start = i + 1
            j = start
            while j < len(lines) and not lines[j].lstrip().startswith("```"):
                j += 1
            marked = i > 0 and SKIP_MARKER in lines[i - 1]
            blocks.append((start + 1, "\n".join(lines[start:j]), marked))
            i = j + 1
            continue
        if line.startswith("    ") and line.strip() and (i == 0 or not lines[i - 1].strip()):
            prev = next((p for p in reversed(lines[:i]) if p.strip()), "")
            if not re.match(r"\s*([*-]|\d+\.)\s", prev) and not prev.startswith(" "):
                j = i
                while j < len(lines) and (lines[j].startswith("    ") or not lines[j].strip()):
                    j += 1
                marked = SKIP_MARKER in (lines[i - 2] if i >= 2 else "")
                blocks.append((i + 1, "\n".join(lines[i:j]), marked))
                i = j
                continue
        i += 1
    return blocks


def _strip_code_blocks(text: str) -> str:
    """The text with every fenced block blanked (line numbers kept), for inline spans."""
    return re.sub(r"```.*?```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)


_SCRIPT = re.compile(r"(?:^|\s)python\s+(train|eval|infer|serve)\.py(?=\s|$)")
_SCRIPT_INLINE = re.compile(r"(?:^|\s)(?:python\s+)?(train|eval|infer|serve)\.py(?=\s|$)")


def _fill_placeholders(command: str) -> str:
    command = re.sub(r"\$\(\([^)]*\)\)", "8000", command)  # port=$((8000 + gpu))
    command = re.sub(r"\$\{?\w+\}?", "0", command)
    command = re.sub(r"<[^<>]*>", "PLACEHOLDER", command)  # <think-SFT export>, <name>
    command = re.sub(r"\[(\w[\w.+]*=[^\]\s]*)\]", r"\1", command)  # [limit=N] -> limit=N
    command = re.sub(r"=(N|\.\.\.)(?=\s|$)", lambda m: "=1" if m.group(1) == "N" else "=PLACEHOLDER", command)
    return command


def _split_commands(
    name: str, first_line: int, source: str, skip: bool, script: re.Pattern = _SCRIPT
) -> list[DocCommand]:
    """Every entry-point command in `source` (a code block or an inline span starting at line `first_line`)."""
    found = []
    lines = source.splitlines()
    joined: list[tuple[int, str]] = []  # continuation lines joined, each with its first line's number
    for k, line in enumerate(lines):
        if joined and joined[-1][1].endswith("\\"):
            joined[-1] = (joined[-1][0], joined[-1][1][:-1] + " " + line)
        else:
            joined.append((first_line + k, line))
    for line_no, line in joined:
        where = f"{name}:{line_no}"
        if "#" in line:  # a shell comment (Hydra values in the docs hold no '#')
            line = re.sub(r"(^|\s)#.*$", "", line)
        for part in re.split(r"&&|\|\||;|\|", line):
            m = script.search(part)
            if not m:
                continue
            rest = _fill_placeholders(part[m.end() :])
            words = [w for w in shlex.split(rest) if w not in ("...", "&", "\\")]
            found.append(DocCommand(where, m.group(1), tuple(words), skip, part.strip()))
    return found


def doc_commands() -> list[DocCommand]:
    commands: list[DocCommand] = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        for start, block, marked in _code_blocks(text):
            commands.extend(_split_commands(path.name, start, block, marked))
        inline = _strip_code_blocks(text)
        # inline spans: `python eval.py ...`, `infer.py think=true` (a span may wrap over a line break)
        for m in re.finditer(r"`((?:python\s+)?(?:train|eval|infer|serve)\.py\s[^`]*)`", inline):
            line_no = inline[: m.start()].count("\n") + 1
            marked = any(SKIP_MARKER in lines[k] for k in (line_no - 2, line_no - 1) if k >= 0)
            commands.extend(
                _split_commands(path.name, line_no, m.group(1).replace("\n", " "), marked, _SCRIPT_INLINE)
            )
    return commands


COMMANDS = doc_commands()


# ------------------------------------------------------------------------------------------------ composing
def _group_options() -> dict[str, set[str]]:
    return {d.name: {p.stem for p in d.glob("*.yaml")} for d in CONFIGS.iterdir() if d.is_dir()}


GROUPS = _group_options()


def _overrides(args: tuple[str, ...]) -> list[str]:
    """The Hydra overrides of a command, a placeholder group choice (`benchmark=<name>`) checked and dropped."""
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        assert sep, f"{arg!r} is not key=value"
        if key.lstrip("+~") in GROUPS and value == "PLACEHOLDER":
            continue
        out.append(arg)
    return out


def compose(script: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return hydra_compose(config_name=script, overrides=overrides, return_hydra_config=True)


def check_command(cmd: DocCommand, monkeypatch: pytest.MonkeyPatch) -> None:
    """Compose, resolve and validate one command's settings, as its entry point would before reading any file."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    cfg = compose(cmd.script, _overrides(cmd.args))
    HydraConfig.instance().set_config(cfg)  # ${hydra:runtime.output_dir} and friends resolve
    try:
        with open_dict(cfg):
            del cfg["hydra"]
        settings = OmegaConf.to_container(cfg, resolve=True)
    finally:
        HydraConfig.instance().cfg = None
    # Commands for GPU machines (device=cuda, trainer=gpu|ddp) are checked as if CUDA were here.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    from musicflamingo.model import lora

    monkeypatch.setattr(lora, "cuda_bf16_support", lambda: (True, "a GPU with native bf16 (stand-in)"))
    if cmd.script == "train":
        from musicflamingo.settings import check_train_settings

        check_train_settings(settings)
    elif cmd.script == "eval":
        from musicflamingo.eval.benchmarks import check_benchmark_keys
        from musicflamingo.settings import check_eval_settings

        check_eval_settings(settings)
        check_benchmark_keys(settings["benchmark"])  # what evaluate() checks before reading the release
    elif cmd.script == "infer":
        from musicflamingo.settings import check_infer_settings

        check_infer_settings(settings)
    else:
        from musicflamingo.serve.settings import ServeSettings

        if settings.get("audio_root") is not None:  # a folder of the reader's machine (/srv/songs): one here
            settings["audio_root"] = str(ROOT)
        ServeSettings.from_cfg(settings)


def test_docs_show_commands_of_every_entry_point():
    """The extraction itself works: every entry point has commands in the docs, and the known ones are found."""
    scripts = {c.script for c in COMMANDS}
    assert scripts == set(ENTRY_POINTS), scripts
    texts = [c.text for c in COMMANDS]
    assert any("experiment=grpo_synthetic" in t for t in texts)  # docs/reasoning.md's indented block
    assert any("benchmark=music_instruct" in t for t in texts)  # an inline span wrapped over two lines
    assert len(COMMANDS) > 40


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if not c.skip], ids=str)
def test_doc_command_composes_and_passes_its_settings_check(cmd, monkeypatch):
    check_command(cmd, monkeypatch)


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if c.skip], ids=str)
def test_doc_command_marked_as_an_error_fails(cmd, monkeypatch):
    with pytest.raises(Exception):  # noqa: B017, PT011 - any refusal: Hydra's or the settings check's
        check_command(cmd, monkeypatch)


def test_a_renamed_key_or_group_breaks_the_check(monkeypatch):
    """The check is strict: a key or group option the configs do not have is refused."""
    for args in (("model.nonexistent=1",), ("experiment=nonexistent",), ("+model.net.lora.rnk=4",)):
        with pytest.raises(Exception):  # noqa: B017, PT011
            check_command(DocCommand("x", "train", args, False, ""), monkeypatch)
    with pytest.raises(Exception):  # noqa: B017, PT011
        check_command(DocCommand("x", "infer", ("quantize=int3",), False, ""), monkeypatch)


# ------------------------------------------------------------------------------------------------ other claims
def _all_text() -> list[tuple[str, str]]:
    return [(p.name, p.read_text(encoding="utf-8")) for p in DOCS]


def test_every_make_target_named_exists():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, flags=re.M))
    missing = []
    for name, text in _all_text():
        for target in re.findall(r"(?:`|^)make ([a-z][\w-]*)", text, flags=re.M):
            if target not in targets:
                missing.append(f"{name}: make {target}")
    assert not missing, missing


_PATH = re.compile(
    r"(?<![\w./-])((?:musicflamingo|configs|tests|bench|docs)/[\w./*-]*[\w*])"
    r"|(?<![\w./-])((?:train|eval|infer|serve)\.py|requirements(?:-test)?\.txt|pyproject\.toml|Makefile)\b"
)


def _ignored(path: str) -> bool:
    """A path git ignores (a build output the docs name, e.g. bench/gpu_site/)."""
    import subprocess

    return any(
        subprocess.run(["git", "check-ignore", "-q", p], cwd=ROOT, check=False).returncode == 0
        for p in (path, path.rstrip("/") + "/")
    )


def test_every_repository_path_named_exists():
    missing = []
    for name, text in _all_text():
        for m in _PATH.finditer(text):
            path = m.group(1) or m.group(2)
            path = path.rstrip(".")
            if "<" in path or "{" in path:
                continue
            if "*" in path:
                if not list(ROOT.glob(path)):
                    missing.append(f"{name}: {path}")
                continue
            if not (ROOT / path).exists() and not _ignored(path):
                missing.append(f"{name}: {path}")
    assert not missing, sorted(set(missing))


def _test_names() -> set[str]:
    names = set()
    for path in (ROOT / "tests").glob("*.py"):
        names |= set(re.findall(r"^\s*def (test_\w+)", path.read_text(encoding="utf-8"), flags=re.M))
    return names


def test_every_test_named_exists():
    names = _test_names()
    missing = []
    for name, text in _all_text():
        for test in re.findall(r"\b(test_\w+)\b(?![.\w])", text):  # not a file name (test_filtered.txt)
            if test.endswith("_"):  # a prefix: test_full_disk_*
                if not any(n.startswith(test) for n in names):
                    missing.append(f"{name}: {test}*")
            elif test not in names and not (ROOT / "tests" / f"{test}.py").exists():
                missing.append(f"{name}: {test}")
    assert not missing, sorted(set(missing))


# Command-line flags the docs name, and the parsers that must take them (bench/ flags belong to performance.md).
FLAG_SOURCES = {
    "README.md": ("musicflamingo/demo.py", "musicflamingo/data/index.py", "musicflamingo/data/shards.py"),
    "main_job.md": ("musicflamingo/demo.py",),
    "reasoning.md": ("musicflamingo/demo.py",),
    "robustness.md": ("musicflamingo/data/shards.py", "musicflamingo/data/index.py"),
    "serving.md": ("bench/serve.py",),
}
# Flags of programs outside this repository that the docs quote (the benchmarks' own scorers).
UPSTREAM_FLAGS = {"evaluation.md": {"--input", "--model_output_column"}}


def _parser_flags(*sources: str) -> set[str]:
    flags: set[str] = set()
    for source in sources:
        text = (ROOT / source).read_text(encoding="utf-8")
        flags |= set(re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", text))
    return flags


def test_every_command_line_flag_named_exists():
    missing = []
    for path in DOCS:
        if path.name == "performance.md":  # bench/*.py flags: the bench smoke tests run those commands
            continue
        # --help: every entry point takes it (argparse's, and Hydra's that infer.py replaces with its settings)
        known = (
            _parser_flags(*FLAG_SOURCES.get(path.name, ()))
            | UPSTREAM_FLAGS.get(path.name, set())
            | {"--help"}
        )
        for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", path.read_text(encoding="utf-8")):
            if flag not in known:
                missing.append(f"{path.name}: {flag}")
    assert not missing, sorted(set(missing))


def test_every_benchmark_setting_named_is_read_by_some_format():
    """`benchmark.<key>` in the docs is a setting some benchmark format reads (`benchmark.task` is the documented
    typo that is refused)."""
    from musicflamingo.eval.benchmarks import COMMON_KEYS, FORMAT_KEYS

    known = set(COMMON_KEYS).union(*FORMAT_KEYS.values())
    missing = []
    for name, text in _all_text():
        for key in re.findall(r"(?<!\w)benchmark\.([a-z_]+)\b", text):
            if key not in known and key != "task":
                missing.append(f"{name}: benchmark.{key}")
    assert not missing, sorted(set(missing))
    assert "+benchmark.task=[music]" in (ROOT / "docs" / "evaluation.md").read_text()


# Dotted names in the docs that are not settings of train.yaml: deliberate typos the docs show being refused, a key
# added with `+`, a tensor name.
NOT_SETTINGS = {
    "model.nonexistent",
    "model.scheduler.warmup_step",
    "model.lora.rnk",
    "model.net.lora.rnk",
    "model.optim.lr",
    "data.batch_max_token",
    "model.rewards.mine",
    "model.multi_modal_projector.linear_1.bias",
}
FILE_SUFFIXES = ("py", "md", "zip", "json", "jsonl", "safetensors", "parquet", "yaml")


def _flat_keys(node, prefix: str = "") -> set[str]:
    out: set[str] = set()
    if isinstance(node, dict):
        for k, v in node.items():
            out.add(f"{prefix}{k}")
            out |= _flat_keys(v, f"{prefix}{k}.")
    return out


def _train_keys() -> set[str]:
    """Every key of train.yaml composed alone, with each experiment, and with the trainer/logger/debug options that
    add keys (fsdp, ddp, many and wandb: every logger)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    keys: set[str] = set()
    variants = [[f"experiment={e}"] for e in sorted(GROUPS["experiment"])]
    variants += [
        ["trainer=fsdp", "logger=many", "debug=fast"],
        ["trainer=ddp", "debug=overfit", "logger=wandb"],
    ]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        for overrides in [[], *variants]:
            cfg = hydra_compose(config_name="train", overrides=overrides)
            keys |= _flat_keys(OmegaConf.to_container(cfg, resolve=False))
    return keys


def test_every_training_setting_named_exists():
    """`model.*`, `data.*`, `trainer.*`, `callbacks.*`, `logger.*` names in the docs are keys of the composed training
    config (some experiment's), Lightning Trainer arguments, or module/class/method names that exist."""
    import lightning

    from musicflamingo.model.musicflamingo import MusicFlamingo

    keys = _train_keys()
    missing = []
    for name, text in _all_text():
        for m in re.finditer(
            r"(?<![\w./])((?:model|data|trainer|callbacks|logger)\.[A-Za-z_][\w.]*\w)", text
        ):
            key = m.group(1)
            parts = key.split(".")
            if key in keys or key in NOT_SETTINGS or parts[-1] in FILE_SUFFIXES:
                continue
            if parts[0] == "trainer" and hasattr(lightning.Trainer, parts[1]):
                continue  # trainer.num_nodes, trainer.save_checkpoint
            if parts[0] == "trainer" and parts[1] in lightning.Trainer.__init__.__code__.co_varnames:
                continue
            if parts[0] == "model" and hasattr(MusicFlamingo, parts[1]):
                continue  # model.generate
            module = ROOT / "musicflamingo" / parts[0] / f"{parts[1]}.py"
            if module.is_file() or (parts[0] == "callbacks" and parts[1][:1].isupper()):
                continue  # data.sampler.TokenBudgetBatchSampler, callbacks.StopOnSignal
            line = text[: m.start()].count("\n") + 1
            missing.append(f"{name}:{line}: {key}")
    assert not missing, missing


def test_readme_config_table_lists_every_option_of_each_group():
    """README's "Configs" table names exactly the YAML files of each group (a new experiment is listed, a removed
    one is not)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `(\w+)/` \| (.*) \|$", readme, flags=re.M))
    assert set(rows) == {"model", "experiment", "trainer", "logger", "debug"}, rows.keys()
    for group, cell in rows.items():
        named = set(re.findall(r"`([a-z][a-z0-9_]*)`", cell))
        assert named == GROUPS[group], (group, named ^ GROUPS[group])


def test_debug_presets_do_what_the_readme_says():
    """README's `debug/` row: `fast` (2 steps), `overfit` (one batch, 200 steps); neither exports."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    row = re.search(r"^\| `debug/` \| (.*) \|$", readme, flags=re.M).group(1)
    fast_steps = int(re.search(r"`fast` \((\d+) steps\)", row).group(1))
    overfit_steps = int(re.search(r"`overfit` \(one batch, (\d+) steps\)", row).group(1))
    assert "neither exports (`export=false`)" in row
    fast = compose("train", ["debug=fast"])
    overfit = compose("train", ["debug=overfit"])
    assert fast.trainer.max_steps == fast_steps and fast.export is False
    assert overfit.trainer.overfit_batches == 1 and overfit.trainer.max_steps == overfit_steps
    assert overfit.export is False


def test_every_plot_eval_writes_is_listed():
    """docs/evaluation.md "Written files" names every PNG file name musicflamingo/eval/report.py writes."""
    report = (ROOT / "musicflamingo" / "eval" / "report.py").read_text(encoding="utf-8")
    names = set(re.findall(r"out_dir / \"([\w.]+\.png)\"", report))
    assert names >= {"confusion_matrix.png", "lyrics_error_by_language.png"}, names
    written = (ROOT / "docs" / "evaluation.md").read_text(encoding="utf-8").split("* Written files:", 1)[1]
    written = written.split("\n* ", 1)[0]
    assert not [n for n in names if f"`{n}`" not in written], names


def test_every_benchmark_is_listed_in_the_readme_and_in_evaluation_md():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    sentence = re.search(r"Benchmarks \(`configs/benchmark/`\):(.*?)each reading", readme, flags=re.S)
    assert sentence, "README's list of benchmarks moved"
    assert set(re.findall(r"`(\w+)`", sentence.group(1))) == GROUPS["benchmark"]
    evaluation = (ROOT / "docs" / "evaluation.md").read_text(encoding="utf-8")
    table = set(re.findall(r"^\| `(\w+)` \|", evaluation, flags=re.M))
    assert table == GROUPS["benchmark"], table ^ GROUPS["benchmark"]


def test_serving_limits_table_gives_the_defaults_of_serve_yaml():
    """docs/serving.md "Limits and safety": each setting's default is configs/serve.yaml's (unset = null)."""
    import yaml

    defaults = yaml.safe_load((CONFIGS / "serve.yaml").read_text(encoding="utf-8"))
    text = (ROOT / "docs" / "serving.md").read_text(encoding="utf-8")
    section = text.split("## Limits and safety", 1)[1].split("\n## ", 1)[0]
    checked = 0
    for names, values in re.findall(r"^\| ((?:`\w+`(?:, | / )?)+) \| ([^|]+) \|", section, flags=re.M):
        keys = re.findall(r"`(\w+)`", names)
        cells = [v.strip() for v in re.split(r", | / ", values.strip())]
        if len(cells) != len(keys):  # one description for several settings ("context - 1")
            cells = cells * len(keys) if len(cells) == 1 else cells
        for key, cell in zip(keys, cells, strict=True):
            assert key in defaults, f"serving.md names {key}, which configs/serve.yaml lacks"
            value = defaults[key]
            if cell.strip("`") == "unset":
                assert value is None, (key, value)
            elif re.fullmatch(r"`?[\w.]+`?", cell) and not cell.startswith("the "):
                shown = str(value).lower() if isinstance(value, bool) else str(value)  # YAML's spelling
                assert shown == cell.strip("`"), (key, value, cell)
            else:  # a description: the setting's default is computed (null in the YAML)
                assert value is None, (key, value, cell)
            checked += 1
    assert checked >= 10
