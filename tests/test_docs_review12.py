"""The docs describe the code as it is (review round 12, docs-drift journey), beyond tests/test_docs_review8.py:

* docs/architecture.md's tree is in import order: every module of the package is placed, and each imports (anywhere
  in its file, as tests/test_imports.py counts) only modules placed above it or beside it on its line; the modules it
  names as the only ones with Lightning or Hydra are exactly those that import them, and none sits above `engine.py`
  ("plain torch down to engine.py"); README's Layout names every file of `musicflamingo/model/`.
* The signatures of docs/architecture.md's "Contracts" are the code's (names, order, defaults).
* Every dotted name the docs cite as code (`checkpoint.stop_ids`, `Engine.admit`, `musicflamingo.eval.LAYOUTS`)
  resolves to a module attribute, a class attribute or an attribute a class sets on its instances.
* A settings error the docs quote (`model.net.lora.rnk=4: unknown setting ...; model.net.lora takes: ...`,
  `seed='abc': expected an integer`) is what the entry point's check prints for that override today.
* docs/robustness.md's exit-code table quotes the line eval.py prints when SIGTERM stops it.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import os
import pkgutil
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_imports import import_graph

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "musicflamingo"
CONFIGS = ROOT / "configs"
# docs/serving.md has its own checks (tests/test_docs_review8.py, the serving journeys)
DOCS = [ROOT / "README.md", *(p for p in sorted((ROOT / "docs").glob("*.md")) if p.name != "serving.md")]
FRAMEWORKS = ("lightning", "pytorch_lightning", "hydra", "omegaconf")


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------------ the tree
def tree_entries(text: str) -> list[list[str]]:
    """The entries of architecture.md's tree, bottom-up: each a list of the paths on its line (`model/config.py`,
    `data/`, or several: `training.py callbacks.py distributed.py`)."""
    section = text.split("## The tree, bottom-up", 1)[1]
    block = section.split("```", 2)[1]
    entries = []
    for line in block.splitlines():
        if not line.startswith("  ") or line.startswith("   "):
            continue  # the musicflamingo/ header, a description's continuation, the repository's other folders
        paths = line[2:].split("  ")[0].split()  # the paths, then two spaces or more before the description
        if paths and all(p.endswith((".py", "/")) for p in paths):
            entries.append(paths)
    return entries


def _module_of(path: str) -> str:
    return "musicflamingo." + path.removesuffix("/").removesuffix(".py").replace("/", ".")


def place_modules(entries: list[list[str]]) -> dict[str, int]:
    """Module name -> its entry's index; a folder entry (`data/`) places every module under it that no entry of its
    own names (`eval/parsing.py` listed apart from `eval/`)."""
    place: dict[str, int] = {}
    for i, paths in enumerate(entries):
        for path in paths:
            if not path.endswith("/"):
                place[_module_of(path)] = i
    for i, paths in enumerate(entries):
        for path in paths:
            if path.endswith("/"):
                package = _module_of(path)
                for file in (PACKAGE / path).rglob("*.py"):
                    name = _module_of(file.relative_to(PACKAGE).as_posix()).removesuffix(".__init__")
                    place.setdefault(name, i)
                place.setdefault(package, i)
    return place


def _package_modules() -> set[str]:
    """Every module of the package but the package itself and the subpackages' __init__ (they only re-export)."""
    names = set()
    for file in PACKAGE.rglob("*.py"):
        if file.name == "__init__.py" or "static" in file.parts:
            continue
        names.add(_module_of(file.relative_to(PACKAGE).as_posix()))
    return names


def order_violations(text: str) -> list[str]:
    place = place_modules(tree_entries(text))
    problems = [f"{m}: not in the tree" for m in sorted(_package_modules() - set(place))]
    for module, imported in sorted(import_graph().items()):
        if module not in place or module.endswith("__init__") or module == "musicflamingo":
            continue
        for other in sorted(imported):
            if other in place and place[other] > place[module]:
                problems.append(f"{module} imports {other}, which the tree places above it")
    return problems


def test_architecture_tree_is_in_import_order():
    """ "Each module imports only modules above it in this list": true of every module, imports inside functions
    included (rewards.py imports eval/parsing.py and the synthetic corpus' theory; settings.py the planner; ...)."""
    assert not order_violations(_read(ROOT / "docs" / "architecture.md"))


def test_the_order_check_sees_a_module_placed_too_low_and_a_missing_one():
    text = _read(ROOT / "docs" / "architecture.md")
    entries = tree_entries(text)
    assert ["chat.py"] in entries and ["data/"] in entries and len(entries) > 30
    swapped = text.replace("  chat.py ", "  chat_.py ", 1).replace("  demo.py ", "  chat.py ", 1)
    problems = order_violations(swapped)
    assert any(p.startswith("musicflamingo.reasoning imports musicflamingo.chat") for p in problems), problems
    assert "musicflamingo.demo: not in the tree" in problems


def _framework_modules() -> set[str]:
    """Package modules that import Lightning, Hydra or OmegaConf anywhere in their file (as `package/file.py`)."""
    found = set()
    for file in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            else:
                continue
            if any(n.split(".")[0] in FRAMEWORKS for n in names):
                found.add(file.relative_to(PACKAGE).as_posix())
    return found


def test_architecture_names_exactly_the_modules_that_import_lightning_or_hydra():
    text = _read(ROOT / "docs" / "architecture.md")
    sentence = re.search(r"Lightning and Hydra only in (.*?) and the entry points\.", text, flags=re.S)
    assert sentence, "architecture.md's sentence naming the Lightning/Hydra modules moved"
    named = set(re.findall(r"`([\w/]+\.py)`", re.sub(r"\([^()]*\)", "", sentence.group(1))))
    actual = _framework_modules()
    assert named == actual, (
        f"named but importing none: {named - actual}; importing but not named: {actual - named}"
    )
    # "Plain torch down to engine.py": nothing placed at or below the engine imports a framework
    entries = tree_entries(text)
    engine = entries.index(["engine.py"])
    low = {p for paths in entries[: engine + 1] for p in paths}
    assert "Plain torch down to `engine.py`" in text
    assert not low & actual, low & actual


def test_readme_layout_names_every_model_file():
    readme = _read(ROOT / "README.md")
    layout = readme.split("## Layout", 1)[1]
    entry = re.search(r"^  model/ +(.*?)^  \w", layout, flags=re.M | re.S).group(1)
    named = set(re.findall(r"\b(\w+\.py)\b", entry))
    files = {p.name for p in (PACKAGE / "model").glob("*.py") if p.name != "__init__.py"}
    assert files <= named, files - named


# ------------------------------------------------------------------------------------------------ contracts
def _doc_signatures() -> list[tuple[str, list[tuple[str, str | None]]]]:
    """(`Name`, [(parameter, default or None)]) of each "Contracts" bullet that starts with a call."""
    text = _read(ROOT / "docs" / "architecture.md")
    section = text.split("## Contracts other modules rely on", 1)[1]
    found = []
    for m in re.finditer(r"^\* `([\w.]+)\(([^`]*)\)`", section, flags=re.M):
        params = []
        for part in re.sub(r"\s+", " ", m.group(2)).split(","):
            part = part.strip()
            if part and part != "*":
                name, _, default = part.partition("=")
                params.append((name.strip(), default.strip() or None))
        found.append((m.group(1), params))
    return found


def _resolve_contract(name: str):  # noqa: ANN202
    from musicflamingo import engine
    from musicflamingo.model.layers import KVCache
    from musicflamingo.model.musicflamingo import MusicFlamingo

    roots = {"MusicFlamingo": MusicFlamingo, "Engine": engine.Engine, "KVCache": KVCache, "engine": engine}
    head, *rest = name.split(".")
    obj = roots[head]
    for attr in rest:
        obj = getattr(obj, attr)
    return obj


def test_architecture_contract_signatures_are_the_codes():
    """`Engine(model, slots=1, capacity=None, compile=False, max_positions=None)` and friends: the parameters in
    order and their defaults. A signature taking **kwargs (engine.generate: its keywords are checked by
    tests/test_engine.py) is skipped."""
    signatures = _doc_signatures()
    assert {n for n, _ in signatures} >= {"MusicFlamingo.forward", "Engine", "KVCache"}, signatures
    wrong = []
    for name, documented in signatures:
        sig = inspect.signature(_resolve_contract(name))
        params = [p for p in sig.parameters.values() if p.name != "self"]
        if any(p.kind is p.VAR_KEYWORD for p in params):
            continue
        actual = [p.name for p in params]
        if [n for n, _ in documented] != actual:
            wrong.append(
                f"{name}: documented ({', '.join(n for n, _ in documented)}), code ({', '.join(actual)})"
            )
            continue
        for (pname, default), p in zip(documented, params, strict=True):
            if default is not None and str(p.default) != default:
                wrong.append(f"{name}: {pname}={default} documented, {pname}={p.default!r} in the code")
            if default is None and p.default is not p.empty:
                wrong.append(f"{name}: {pname} has the default {p.default!r}, not documented")
    assert not wrong, wrong


def test_kvcache_methods_named_in_the_contract_exist():
    from musicflamingo.model.layers import KVCache

    text = _read(ROOT / "docs" / "architecture.md")
    bullet = re.search(r"^\* `KVCache\(.*?(?=^\* |\Z)", text, flags=re.M | re.S).group(0)
    methods = re.findall(r"`(\w+)(?:\([^`]*\))?`", bullet.split(":", 1)[1])
    methods = [m for m in methods if m not in {"layers", "rows", "slots"} and not m.startswith("lengths")]
    assert {"view_prefill", "view_decode", "resize"} <= set(methods), methods
    assert not [m for m in methods if not hasattr(KVCache, m)], methods


# ------------------------------------------------------------------------------------------------ cited names
SUFFIXES = {"py", "md", "json", "jsonl", "yaml", "safetensors", "txt", "parquet", "png", "csv", "ckpt", "tmp"}
SUFFIXES |= {"lock", "wav", "mp3", "flac", "log", "zip", "gz", "bin", "model", "au", "mp4", "jinja"}
# roots that are config keys unless a module of that name follows (`model.net.lora` vs `model.layers.KVCache`)
CONFIG_ROOTS = {
    "model",
    "data",
    "eval",
    "audio",
    "serve",
    "trainer",
    "callbacks",
    "logger",
    "benchmark",
    "paths",
}
CONFIG_ROOTS |= {"hydra", "tokenizer"}
# deliberate typos the docs show being refused
NOT_NAMES = {"model.lora.rnk"}


class _Names:
    """The package's modules, their classes, and the attributes those classes set on their instances."""

    def __init__(self) -> None:
        import musicflamingo

        self.modules = {}
        for info in pkgutil.walk_packages(musicflamingo.__path__, "musicflamingo."):
            self.modules[info.name] = importlib.import_module(info.name)
        self.short: dict[
            str, str
        ] = {}  # `eval.parsing`, `parsing` -> musicflamingo.eval.parsing (shallowest first)
        for full in sorted(self.modules, key=lambda n: n.count(".")):
            parts = full.split(".")[1:]
            for k in range(len(parts)):
                self.short.setdefault(".".join(parts[k:]), full)
        self.classes = {}
        for module in self.modules.values():
            for name, obj in vars(module).items():
                if inspect.isclass(obj) and obj.__module__.startswith("musicflamingo"):
                    self.classes.setdefault(name, obj)

    @staticmethod
    def _has(obj: object, attr: str) -> bool:
        if hasattr(obj, attr):
            return True
        if inspect.isclass(obj):  # an attribute set in a method (`self.generation_defaults = ...`)
            return any(
                re.search(rf"\bself\.{attr}\s*(?::[^=]*)?=[^=]", inspect.getsource(k))
                for k in obj.__mro__
                if k.__module__.startswith("musicflamingo")
            )
        return False

    def _walk(self, obj: object, attrs: list[str]) -> bool:
        for attr in attrs:
            if not self._has(obj, attr):
                return False
            obj = getattr(obj, attr, None)
            if obj is None:  # an instance attribute: nothing further to check
                return True
        return True

    def problem(self, name: str) -> str | None:
        """None when `name` resolves, else why not."""
        parts = name.split(".")
        if parts[0] == "musicflamingo":
            parts = parts[1:]
        if parts and parts[0] in self.classes and parts[0] not in self.short:
            return (
                None if self._walk(self.classes[parts[0]], parts[1:]) else f"class {parts[0]} has no {name}"
            )
        for k in range(len(parts), 0, -1):
            full = self.short.get(".".join(parts[:k]))
            if full is None:
                continue
            module = self.modules[full]
            if self._walk(module, parts[k:]):
                return None
            # `processor.apply_chat_template`, `datamodule.setup`: a method of a class of that module
            classes = [c for c in vars(module).values() if inspect.isclass(c) and c.__module__ == full]
            if parts[k:] and any(self._walk(c, parts[k:]) for c in classes):
                return None
            return f"{full} has no {'.'.join(parts[k:])}"
        return None  # not ours (a library's name, a file)


def cited_name_problems(name_of_doc: str, text: str, names: _Names) -> list[str]:
    problems = []
    for m in re.finditer(r"(?<![\w/.=-])([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)(?![\w/-])", text):
        name = m.group(1)
        parts = name.split(".")
        if parts[-1] in SUFFIXES or name in NOT_NAMES:
            continue
        if parts[0] in CONFIG_ROOTS and f"{parts[0]}.{parts[1]}" not in names.short:
            continue  # a setting (model.net.lora.rank): tests/test_docs_review8.py checks those
        why = names.problem(name)
        if why:
            problems.append(f"{name_of_doc}:{text[: m.start()].count(chr(10)) + 1}: {name}: {why}")
    return problems


@pytest.fixture(scope="module")
def names() -> _Names:
    return _Names()


def test_every_code_name_cited_resolves(names):
    problems = []
    for path in DOCS:
        problems += cited_name_problems(path.name, _read(path), names)
    assert not problems, problems


def test_a_renamed_function_or_method_is_caught(names):
    text = "`checkpoint.stop_ids`, `Engine.admit`, `musicflamingo.eval.LAYOUTS`, `MusicFlamingo.generation_defaults`"
    assert not cited_name_problems("x", text, names)
    bad = "`checkpoint.stop_idz`, `Engine.admitt`, `musicflamingo.eval.LAYOUT`, `runfolder.RunLock`"
    assert len(cited_name_problems("x", bad, names)) == 4


# ------------------------------------------------------------------------------------------------ quoted errors
def _quoted_setting_errors() -> list[tuple[str, str, str]]:
    """(where, override, quoted message) of every error the docs quote for an override: `<key>=<value>: ...`."""
    found = []
    for path in DOCS:
        text = _read(path)
        for m in re.finditer(
            r"`(?:error: |eval\.py: error: )?([a-z_][\w.]*=(?:'[^'`]*'|[^:`\s'\[{]+)): ([^`]+)`", text
        ):
            key, _, value = m.group(1).partition("=")
            if value.startswith("'") and value.endswith("'"):
                value = value[1:-1]
            where = f"{path.name}:{text[: m.start()].count(chr(10)) + 1}"
            found.append((where, f"{key}={value}", f"{m.group(1)}: {m.group(2)}"))
    return found


def _pattern(quoted: str) -> re.Pattern:
    """The quoted message as a pattern: `...` stands for anything."""
    return re.compile(".*".join(re.escape(p) for p in quoted.split("...")), flags=re.S)


def _flat_keys(node: object, prefix: str = "") -> set[str]:
    out: set[str] = set()
    if isinstance(node, dict):
        for k, v in node.items():
            out.add(f"{prefix}{k}")
            out |= _flat_keys(v, f"{prefix}{k}.")
    return out


@functools.cache
def _config_keys(script: str) -> frozenset[str]:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return frozenset(_flat_keys(OmegaConf.to_container(compose(config_name=script), resolve=False)))


def setting_errors(override: str, capsys: pytest.CaptureFixture) -> Iterator[str]:
    """The lines the entry points print for `override` (and for `+override` where the key is new), one by one: the
    command-line check's, else each entry point's settings check's."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from musicflamingo.cli import check_command_line
    from musicflamingo.settings import check_eval_settings, check_infer_settings, check_train_settings

    for script, check, base in (
        ("train", check_train_settings, ["data.train=x.jsonl", "paths.output_dir=x"]),
        ("eval", check_eval_settings, ["ckpt=x", "benchmark.root=x"]),
        ("infer", check_infer_settings, ["ckpt=x", "audio=x.wav"]),
    ):
        new_key = override.split("=", 1)[0] not in _config_keys(script)
        for arg in [override, "+" + override] if new_key else [override]:
            try:
                check_command_line(script, [arg])
            except SystemExit:
                yield capsys.readouterr().err.strip().removeprefix("error: ")
                continue
            with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
                cfg = compose(config_name=script, overrides=[*base, arg])
            try:
                check(OmegaConf.to_container(cfg, resolve=True))
            except ValueError as e:
                yield str(e)


QUOTED = _quoted_setting_errors()


def test_the_docs_quote_setting_errors():
    overrides = {o for _, o, _ in QUOTED}
    assert {"model.net.lora.rnk=4", "model.nonexistent=1", "seed=abc", "max_new_tokens=-5"} <= overrides, (
        QUOTED
    )


@pytest.mark.parametrize(("where", "override", "quoted"), QUOTED, ids=[f"{w} {o}" for w, o, _ in QUOTED])
def test_a_quoted_setting_error_is_what_the_check_prints(where, override, quoted, capsys):
    lines = []
    for line in setting_errors(override, capsys):
        if _pattern(quoted).fullmatch(line):
            return
        lines.append(line)
    pytest.fail(f"{where} quotes {quoted!r}; the checks print {lines}")


# ------------------------------------------------------------------------------------------------ exit codes
def _exit_code_row(code: int) -> dict[str, str]:
    text = _read(ROOT / "docs" / "robustness.md")
    table = text.split("## 0. Exit codes", 1)[1].split("\n## ", 1)[0]
    header = next(line for line in table.splitlines() if line.startswith("| code |"))
    columns = [c.strip().strip("`") for c in header.strip("|").split("|")]
    row = next(line for line in table.splitlines() if line.startswith(f"| {code} |"))
    cells = [c.strip() for c in re.split(r"(?<!\\)\|", row.strip().strip("|"))]
    return dict(zip(columns, cells, strict=True))


def test_robustness_exit_table_quotes_what_eval_py_prints_on_sigterm(tmp_path):
    """eval.py stops on SIGTERM with one line and 143 (musicflamingo.eval.runner.stop_on_sigterm); the table said
    it was killed by the signal."""
    from musicflamingo.eval.runner import EvalInterrupted, stop_on_sigterm

    predictions = tmp_path / "predictions.jsonl"
    with pytest.raises(EvalInterrupted) as stop, stop_on_sigterm(predictions):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handler runs between bytecodes of the main thread
            pass
    assert stop.value.exit_code == 143
    printed = f"eval.py: error: {stop.value}".replace(str(tmp_path), "<folder>")
    cell = _exit_code_row(143)["eval.py"]
    quoted = re.findall(r"`([^`]*SIGTERM[^`]*)`", cell)
    assert quoted, f"robustness.md's 143 row for eval.py quotes no line: {cell}"
    assert any(q == printed for q in quoted), (quoted, printed)


def test_error_types_live_where_the_docs_say():
    """`ManifestError` (`data/manifest.py`), `EvalConfigError`, `BenchmarkError` (`eval/`): each class is defined in
    that file or folder of the package."""
    checked, wrong = 0, []
    for path in DOCS:
        for names, where in re.findall(
            r"((?:`[A-Za-z_]\w*`, )*`[A-Za-z_]\w*`) \(`([a-z_/]+(?:\.py|/))`\)", _read(path)
        ):
            files = [PACKAGE / where] if where.endswith(".py") else sorted((PACKAGE / where).rglob("*.py"))
            source = "".join(f.read_text(encoding="utf-8") for f in files if f.is_file())
            for name in re.findall(r"`(\w+)`", names):
                checked += 1
                if not re.search(rf"^class {name}\b", source, flags=re.M):
                    wrong.append(f"{path.name}: {name} is not defined in musicflamingo/{where}")
    assert checked >= 10 and not wrong, (checked, wrong)


# ------------------------------------------------------------------------------------------------ numbers
def _demo_default(flag: str) -> float:
    source = _read(PACKAGE / "demo.py")
    m = re.search(rf'add_argument\(\s*"{flag}",(?:(?!add_argument).)*?default=([\d.]+)', source, flags=re.S)
    assert m, f"demo.py's {flag} moved"
    return float(m.group(1))


def test_audio_limits_and_the_main_job_numbers_are_the_codes():
    """README's audio limits, the main job's preset, budget and clip counts, and main_job.md's recipe table (steps,
    learning rates) are the values the code and configs set."""
    import yaml

    from musicflamingo.audio.features import CHUNK_LENGTH, MAX_AUDIO_LEN, SAMPLING_RATE
    from musicflamingo.model.config import MusicFlamingoConfig

    readme = re.sub(r"\s+", " ", _read(ROOT / "README.md"))
    m = re.search(r"-> (\d+) kHz mono; (\d+) s windows, at most (\d+) \((\d+) min", readme)
    assert m, "README's audio limits moved"
    assert [int(g) for g in m.groups()] == [
        SAMPLING_RATE // 1000,
        CHUNK_LENGTH,
        MAX_AUDIO_LEN // CHUNK_LENGTH,
        MAX_AUDIO_LEN // 60,
    ], m.group(0)

    small = MusicFlamingoConfig.from_name("small")
    m = re.search(
        r"the `small` preset \(([\d.]+) M parameters, (\d+) s audio windows\) for at most (\d+) minutes",
        readme,
    )
    assert m, "README's main-job sentence moved"
    assert float(m.group(1)) == round(small.num_parameters() / 1e6, 1)
    window_s = small.audio.max_source_positions * 2 * 160 / 16000  # 2 mel frames of 160 samples per position
    assert int(m.group(2)) == window_s and int(m.group(3)) == _demo_default("--minutes")
    m = re.search(r"(\d+) training clips, (\d+) test clips", readme)
    assert [int(g) for g in m.groups()] == [_demo_default("--n-train"), _demo_default("--n-test")]

    main_job = _read(ROOT / "docs" / "main_job.md")
    rows = re.findall(
        r"^\| (\d) \(`experiment=(\w+)`\) \| [^|]* \| (\d+)[^|]* \| [^|]*lr ([\d.e-]+) \(projector ([\d.e-]+)\)",
        main_job,
        flags=re.M,
    )
    assert len(rows) == 2, rows
    for stage, experiment, steps, lr, projector_lr in rows:
        cfg = yaml.safe_load(_read(CONFIGS / "experiment" / f"{experiment}.yaml"))
        assert float(lr) == cfg["model"]["optimizer"]["lr"], (experiment, lr)
        assert float(projector_lr) == cfg["model"]["part_lr"]["multi_modal_projector"], (
            experiment,
            projector_lr,
        )
        assert int(steps) == _demo_default("--max-steps" if stage == "1" else "--caption-steps"), (
            stage,
            steps,
        )


def test_readme_names_every_entry_point_with_a_memory_plan():
    """README's "Memory: `plan=true` (on ...)" names each entry point whose config has `plan` (serve.py has had it
    since ad71134)."""
    import yaml

    readme = _read(ROOT / "README.md")
    m = re.search(r"Memory: `plan=true` \((.*?)\) prints", readme, flags=re.S)
    assert m, "README's memory paragraph moved"
    named = set(re.findall(r"`(\w+)\.py`", m.group(1)))
    with_plan = {p.stem for p in CONFIGS.glob("*.yaml") if "plan" in (yaml.safe_load(_read(p)) or {})}
    assert {"train", "serve"} <= with_plan, with_plan  # the check reads the YAML files
    assert named == with_plan, named ^ with_plan


def test_every_bench_flag_the_docs_show_exists():
    """`python bench/<script>.py --flag ...` in README and docs/performance.md (tests/test_docs_review8.py leaves
    performance.md's flags out): each flag is one its script's parser takes."""
    missing, checked = [], 0
    for path in (ROOT / "README.md", ROOT / "docs" / "performance.md"):
        for m in re.finditer(r"python (bench/\w+\.py)([^`\n]*)", _read(path)):
            script = ROOT / m.group(1)
            assert script.is_file(), f"{path.name}: {m.group(1)}"
            flags = set(re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", _read(script)))
            for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", m.group(2).split("#")[0]):
                checked += 1
                if flag not in flags:
                    missing.append(f"{path.name}: {m.group(1)} {flag}")
    assert checked >= 10 and not missing, (checked, missing)
