"""The docs describe the code as it is (review round 16, docs-drift journey), beyond tests/test_docs_review8.py and
tests/test_docs_review12.py:

* Every inline code span made only of Hydra overrides (`do_sample=true temperature=0.7`, `trainer=fsdp
  trainer.devices=2`, `benchmark.tasks=music`, `logger.wandb.rewind=true`) is one Hydra reads (no sweep without -m),
  its group options exist, and some entry point has all its keys, in its composed config or in an option of one of
  its groups (a benchmark's, an experiment's, a logger's): a renamed setting the prose names is caught, which the
  command checks of tests/test_docs_review8.py (whole `python X.py ...` commands) do not see. Spans the docs show
  being refused must fail; a bare `key=` that is no setting of any entry point is one of the Python keywords or
  release fields listed here.
* Every metric the training code logs (`self.log("train/...")`, `lr/<group>`) is named in the docs, and every metric
  the docs name is logged.
* docs/robustness.md's table of error types names every `ValueError` subclass the package defines.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

from test_docs_review8 import DOCS, GROUPS, SKIP_MARKER, _fill_placeholders, _strip_code_blocks, compose

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "musicflamingo"
ENTRY_POINTS = ("train", "infer", "eval", "serve")

# ------------------------------------------------------------------------------------------------ override spans
_OVERRIDE = re.compile(r"[+~]{0,2}[a-z_][\w.]*=\S*")
_ENTRY_SPAN = re.compile(
    r"(?:python\s+)?(?:train|eval|infer|serve)\.py(?:\s|$)"
)  # tests/test_docs_review8.py's

# Spans that show an override being refused (a typo, a value Hydra cannot read, a comma without -m, a key that is
# not a setting): each must fail to compose, so a fix in the configs that makes one work is noticed here.
REFUSED = {
    "model.nonexistent=1",
    "benchmark=gtzann",
    "audio=café.flac",
    "seed=1,2",
    "experment=lora",
    "+exprt=false",
    "+key=value",
    # misspelt keys added with `+`, which the entry points' settings check refuses (tests/test_docs_review12.py
    # checks the message quoted beside them)
    "+benchmark.task=[music]",
    "+model.lora.rnk=4",
    "+model.net.lora.rnk=4",
    "+model.scheduler.warmup_step=100",
    "+model.optim.lr=1",
    "+data.batch_max_token=10",
}
# Settings whose keys are the user's names (`model.rewards.<name>`): a `+` key under one adds an entry.
OPEN = ("model.rewards.",)
# Spans in the syntax of overrides that are Python (the reference's generate() arguments).
PYTHON = {"max_new_tokens=min_new_tokens=64"}
# `key=` in prose that is not an entry point's setting: Python keywords of the API (`generate(eos_token_id=None)`,
# `Engine(...)`), fields of a benchmark's release rows, the reference's `generate` arguments, litdata's options,
# Lightning's Trainer arguments and ModelConfig fields quoted in an error message.
NOT_ENTRY_SETTINGS = {
    "tokenizer",
    "eos_token_id",
    "pad_token_id",
    "split",
    "tasks",
    "format",
    "unit",
    "modalities",
    "return_logits",
    "max_source_positions",
    "stop_token_ids",
    "keep_data_ordered",
    "bad_sample_policy",
    "audio_config.hidden_size",
    "betas",
    "max_epochs",
    "overwrite",
    "max_length",
    "on_oversized",
    "max_bad_fraction",
    "mmap",
    "nonfinite_loss",
    # the processor's and tokenizer's transformers keywords (README, "Code ported from transformers")
    "padding",
    "return_tensors",
    "skip_special_tokens",
    "clean_up_tokenization_spaces",
    "add_special_tokens",
}


def override_spans() -> list[tuple[str, list[str], bool]]:
    """(file:line, overrides, shown as refused) of every inline code span made only of overrides."""
    spans = []
    for path in DOCS:
        source = path.read_text(encoding="utf-8")
        lines, text = source.splitlines(), _strip_code_blocks(source)
        for m in re.finditer(r"`([^`]+)`", text):
            span = m.group(1).replace("\n", " ").strip()
            words = span.split()
            if _ENTRY_SPAN.match(span) or not words or not all(_OVERRIDE.fullmatch(w) for w in words):
                continue
            line = text[: m.start()].count("\n") + 1
            marked = any(SKIP_MARKER in lines[k] for k in (line - 2, line - 1) if 0 <= k < len(lines))
            if span not in PYTHON:
                spans.append((f"{path.name}:{line}", words, marked or span in REFUSED))
    return spans


def _flat(node: object, prefix: str = "") -> set[str]:
    out: set[str] = set()
    if isinstance(node, dict):
        for k, v in node.items():
            out.add(f"{prefix}{k}")
            out |= _flat(v, f"{prefix}{k}.")
    return out


@functools.cache
def entry_keys(script: str) -> frozenset[str]:
    """Every key an override may name on `script`: its composed config's, and those each option of a config group
    adds (an experiment's or a debug preset's, a logger's, a trainer's, a benchmark's), read from the YAML files."""
    from omegaconf import OmegaConf

    cfg = compose(script, [])
    keys = _flat(OmegaConf.to_container(cfg, resolve=False))
    chosen = set(cfg.hydra.runtime.choices) if "hydra" in cfg else set()
    for group in chosen & set(GROUPS):
        for option in (ROOT / "configs" / group).glob("*.yaml"):
            node = OmegaConf.to_container(OmegaConf.load(option), resolve=False) or {}
            node.pop("defaults", None)
            glob = "@package _global_" in option.read_text(encoding="utf-8")
            keys |= _flat(node, "" if glob else f"{group}.") | ({group} if not glob else set())
    return frozenset(keys - {"hydra"} | set(GROUPS))


def override_problem(words: list[str]) -> str | None:
    """Why a span of overrides would not compose on any entry point (None: some entry point takes it all): Hydra's
    grammar refuses a word, a value list without -m, an unknown group option, or no entry point has all its keys
    (a key added with `+` too, so that it is a setting once added, except the user's own names under OPEN)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides([_fill_placeholders(w) for w in words])
    except Exception as e:  # noqa: BLE001 - Hydra's grammar error, whatever its type
        return f"Hydra cannot read it ({type(e).__name__})"
    if any(o.is_sweep_override() for o in parsed):
        return "a sweep: needs -m"
    for o in parsed:
        if o.key_or_group in GROUPS and isinstance(o.value(), str) and o.value() != "PLACEHOLDER":
            if o.value() not in GROUPS[o.key_or_group]:
                return f"{o.key_or_group}={o.value()}: no such option"
    keys = {
        o.key_or_group
        for o in parsed
        if not o.key_or_group.startswith("hydra.")  # Hydra's own settings
        and not (o.is_add() and o.key_or_group.startswith(OPEN))
    }
    if not any(keys <= entry_keys(s) for s in ENTRY_POINTS):
        return f"no entry point has {sorted(keys)} at once"
    return None


def composes(words: list[str]) -> bool:
    return override_problem(words) is None


SPANS = override_spans()


def test_override_spans_are_found():
    """The extraction works: the docs' known override spans are among them, and so are the refused ones."""
    found = {" ".join(words) for _, words, _ in SPANS}
    for span in (
        "skip_bad_audio=true",
        "logger.wandb.rewind=true",
        "benchmark.tasks=music",
        "model.think=false",
    ):
        assert span in found, span
    assert {" ".join(w) for _, w, refused in SPANS if refused} >= {"experment=lora", "benchmark=gtzann"}
    assert len(SPANS) > 60


def test_every_override_span_composes_with_some_entry_point():
    wrong = []
    for where, words, refused in SPANS:
        keys = {w.lstrip("+~").split("=")[0] for w in words}
        if refused or keys <= NOT_ENTRY_SETTINGS:  # NOT_ENTRY_SETTINGS: checked below, each listed on purpose
            continue
        problem = override_problem(words)
        if problem:
            wrong.append(f"{where}: `{' '.join(words)}`: {problem}")
    assert not wrong, wrong


def test_every_override_span_shown_as_refused_does_not_compose():
    wrong = [f"{where}: `{' '.join(w)}`" for where, w, refused in SPANS if refused and composes(w)]
    assert not wrong, f"shown as refused, but these compose: {wrong}"


def test_keys_that_are_not_settings_are_still_named():
    """NOT_ENTRY_SETTINGS holds only names the docs use, none of which became a setting of an entry point."""
    named = {w.lstrip("+~").split("=")[0] for _, words, _ in SPANS for w in words}
    settings = set().union(*map(entry_keys, ENTRY_POINTS))
    assert NOT_ENTRY_SETTINGS <= named, NOT_ENTRY_SETTINGS - named
    assert not NOT_ENTRY_SETTINGS & settings, NOT_ENTRY_SETTINGS & settings


def test_the_span_check_catches_a_renamed_setting():
    assert composes(["skip_bad_audio=true"])
    assert not composes(["skip_bad_audios=true"])
    assert composes(["benchmark.tasks=music"])  # a key some benchmark option reads
    assert not composes(["benchmark.taskz=music"])
    assert composes(["model.think=false"])  # experiment=grpo's
    assert not composes(["trainer=fsdpp"])
    assert not composes(["skip_bad_audio=true", "trainer.devices=2"])  # no entry point has both


# ------------------------------------------------------------------------------------------------ metrics
def _docs_text() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in DOCS)


def logged_metrics() -> set[str]:
    """Metric names the package logs with `self.log` / `pl_module.log` (f-string fields as `<>`)."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        for m in re.finditer(
            r"\.log\(\s*(f?)\"((?:train|val|lr)/[^\"]*)\"", path.read_text(encoding="utf-8")
        ):
            names.add(re.sub(r"\{[^}]*\}", "<>", m.group(2)))
    return names


def named_metrics(text: str) -> set[str]:
    return {re.sub(r"<[^>]*>", "<>", m) for m in re.findall(r"`((?:train|val|lr)/[\w<>/]+)`", text)}


def test_every_metric_logged_is_named_in_the_docs_and_back():
    logged, named = logged_metrics(), named_metrics(_docs_text())
    assert {"train/loss", "val/loss", "lr/<>", "train/reward/<>"} <= logged, logged
    assert logged - named == set(), f"logged, named in no doc: {sorted(logged - named)}"
    assert named - logged == set(), f"named in the docs, logged nowhere: {sorted(named - logged)}"


# ------------------------------------------------------------------------------------------------ error types
def value_error_types() -> dict[str, tuple[str, list[str]]]:
    """Every class of the package that derives (through the package's own classes) from ValueError: name -> (file,
    its bases' names)."""
    bases: dict[str, tuple[list[str], str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                names = [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases]
                bases[node.name] = (names, str(path.relative_to(PACKAGE)))

    @functools.cache
    def is_value_error(name: str) -> bool:
        if name == "ValueError":
            return True
        # a class named as its base (`class X(other.X)`) is not its own ancestor
        return name in bases and any(b != name and is_value_error(b) for b in bases[name][0])

    return {name: (where, names) for name, (names, where) in bases.items() if is_value_error(name)}


# a base class no code raises itself (FolderLock callers pass their own: RunFolderInUseError, ...)
NOT_RAISED = {"FolderInUseError"}


def test_the_robustness_error_table_names_every_value_error_the_package_defines():
    text = (ROOT / "docs" / "robustness.md").read_text(encoding="utf-8")
    table = text[text.index("## 1. Bad input") : text.index("## 2.")]
    rows = "\n".join(line for line in table.splitlines() if line.startswith("| `"))
    named = {
        n for cell in re.findall(r"^\| ([^|]*) \|", rows, flags=re.M) for n in re.findall(r"`(\w+)`", cell)
    }
    types = value_error_types()
    assert {"ShardError", "RankMismatchError", "SettingsError"} <= set(types), types
    # a private class, or one whose bases are all listed (caught as them), needs no row of its own
    missing = sorted(
        f"{name} ({where})"
        for name, (where, parents) in types.items()
        if name not in named | NOT_RAISED
        and not name.startswith("_")
        and not all(b in named and b != "ValueError" for b in parents)
    )
    assert not missing, f"docs/robustness.md section 1 does not list: {missing}"


# ------------------------------------------------------------------------------------------------ README's layout
def _readme_layout() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Layout") :]
    return section[: section.index("```", section.index("```") + 3)]


def layout_gaps(layout: str) -> list[str]:
    """Modules of the package's top level and of data/, and config groups, that README's Layout leaves out."""
    gaps = [
        f"musicflamingo/{p.name}"
        for p in sorted(PACKAGE.glob("*.py"))
        if not p.name.startswith("__") and not re.search(rf"(?<![\w/]){re.escape(p.name)}\b", layout)
    ]
    gaps += [
        f"musicflamingo/{p.name}/"
        for p in sorted(PACKAGE.iterdir())
        if p.is_dir() and p.name != "__pycache__" and f"{p.name}/" not in layout
    ]
    data = layout[layout.index("  data/") :].split("\n  lit.py")[0]
    gaps += [
        f"musicflamingo/data/{p.name}"
        for p in sorted((PACKAGE / "data").glob("*.py"))
        if not p.name.startswith("__") and not re.search(rf"\b{p.stem}\b", data)
    ]
    configs = next(line for line in layout.splitlines() if line.startswith("configs/"))
    gaps += [
        f"configs/{d.name}/"
        for d in sorted((ROOT / "configs").iterdir())
        if d.is_dir() and f" {d.name}/" not in configs
    ]
    return gaps


def test_readme_layout_names_every_module_and_config_group():
    assert not layout_gaps(_readme_layout())


def test_the_layout_check_sees_a_module_left_out():
    layout = _readme_layout()
    assert layout_gaps(layout.replace("loggers.py", "")) == ["musicflamingo/loggers.py"]
    assert layout_gaps(layout.replace("shards (litdata)", "")) == ["musicflamingo/data/shards.py"]
    assert layout_gaps(layout.replace(" paths/", "")) == ["configs/paths/"]
