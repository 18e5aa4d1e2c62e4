"""Command-line inference: captions and questions about audio files, streamed; and a multi-turn chat.

`infer(cfg)` is what `infer.py` (a thin `@hydra.main` wrapper) and the tests call. One batch per `batch_size`
files goes through `stream_generate`; row 0 is printed live, token by token, and every other row is printed,
labelled with its file, as soon as it finishes (after row 0). `ChatSession` keeps one KV cache for the whole
conversation: each turn prefills only its new tokens at positions continuing the cache, so the audio is encoded
once, in the turn that brings it, and the answer equals a from-scratch `generate` over the full conversation.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from musicflamingo.audio.io import AudioError
from musicflamingo.checkpoint import CheckpointError, load_config
from musicflamingo.generation import sample_next
from musicflamingo.model import MusicFlamingo
from musicflamingo.model.config import ConfigError
from musicflamingo.model.qwen2 import KVCache
from musicflamingo.processor import MusicFlamingoProcessor
from musicflamingo.tokenizer import Tokenizer, TokenizerError

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = (
    "Describe this track in full detail - tell me the genre, tempo, and key, then dive into the instruments, "
    "production style, and overall mood it creates."
)
# The Music Flamingo chat template closes every turn with this (reference spec §3.4).
END_OF_TURN = "<|im_end|>"


class InferenceError(ValueError):
    """Bad inference settings or inputs (the message names the field or file and what was expected)."""


# Errors caused by the user's inputs: `infer.py` prints them as one line instead of a traceback.
USER_ERRORS: tuple[type[ValueError], ...] = (
    InferenceError,
    CheckpointError,
    AudioError,
    TokenizerError,
    ConfigError,
)


# ---------------------------------------------------------------------------------------------- settings
@dataclass
class GenerationOptions:
    """Decoding settings shared by batch inference and chat (greedy by default, as the release)."""

    max_new_tokens: int = 1024
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    compile: bool = False  # torch.compile the decode step (batch inference; the chat loop stays eager)

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InferenceError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if self.do_sample and not self.temperature > 0:
            raise InferenceError(f"temperature must be > 0 when do_sample=true, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InferenceError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise InferenceError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any]) -> GenerationOptions:
        d = cls()
        return cls(**{k: cfg.get(k, getattr(d, k)) for k in d.__dataclass_fields__})

    def generator(self, device: torch.device) -> torch.Generator | None:
        if not self.do_sample:
            return None
        g = torch.Generator(device=device)
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(int(self.seed))
        return g


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
# `auto` on CPU keeps float32 only when its weights leave this much of the available memory for activations,
# the KV cache and the rest of the process.
CPU_FLOAT32_HEADROOM = 1.25


def available_memory(device: torch.device) -> int | None:
    """Bytes `device` can still allocate: CUDA's free memory; on CPU the system's available memory, lowered to a
    cgroup (container) limit minus its usage when one is set. None when unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        import psutil

        free = int(psutil.virtual_memory().available)
    except Exception:  # pragma: no cover - psutil is a requirement; a sandbox may still refuse it
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit.isdigit():
            free = min(free, int(limit) - used)
    except (OSError, ValueError):
        pass
    return free


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def resolve_device_dtype(
    device: str | None = "auto", dtype: str | None = "auto", num_parameters: int | None = None
) -> tuple[torch.device, torch.dtype]:
    """`auto` device = cuda when available else cpu; `auto` dtype = bfloat16 on CUDA, float32 on CPU.

    With `num_parameters`, the weights must fit in the device's available memory (:func:`available_memory`):
    `auto` on CPU falls back to bfloat16 when float32 weights would not leave room (the released 8.27 B
    checkpoint needs 33 GB in float32, 16.5 GB in bfloat16), and a dtype whose weights alone exceed the memory
    is refused here, with the numbers, rather than by the kernel's out-of-memory killer mid-load.
    """
    device = "auto" if device is None else str(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InferenceError(f"device={device!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InferenceError(f"device={device!r} but CUDA is not available here; use device=cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InferenceError(
            f"device={device!r} but this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    name = "auto" if dtype is None else str(dtype).replace("torch.", "")
    free = available_memory(dev) if num_parameters else None
    if name == "auto":
        name = "bfloat16" if dev.type == "cuda" else "float32"
        if name == "float32" and free is not None and 4 * num_parameters * CPU_FLOAT32_HEADROOM > free:
            logger.info(
                "dtype=auto: float32 weights (%s) would not fit in the %s of memory available, using bfloat16",
                _gb(4 * num_parameters),
                _gb(free),
            )
            name = "bfloat16"
    if name not in _DTYPES:
        names = sorted(set(_DTYPES) - {"fp32", "bf16", "fp16"})
        raise InferenceError(f"dtype={name!r}: expected one of {names} or 'auto'")
    dt = _DTYPES[name]
    if free is not None:
        need = num_parameters * torch.empty((), dtype=dt).element_size()
        if need > free:
            hint = " (try dtype=bfloat16, half the size)" if dt == torch.float32 else ""
            raise InferenceError(
                f"the model's weights need {_gb(need)} in {name} but {dev} has {_gb(free)} available{hint}"
            )
    return dev, dt


def check_checkpoint_dir(ckpt: Any) -> Path:
    """Fail fast, before loading any weights, when `ckpt` is not a Music Flamingo checkpoint folder."""
    if ckpt is None or str(ckpt).strip() == "":
        raise InferenceError("ckpt is not set: pass ckpt=/path/to/checkpoint_folder")
    path = Path(str(ckpt)).expanduser()
    if not path.exists():
        raise InferenceError(f"ckpt={path}: folder does not exist")
    if not path.is_dir():
        raise InferenceError(f"ckpt={path}: not a folder (expected config.json + safetensors + tokenizer)")
    load_config(path)  # CheckpointError without config.json or with another model_type
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()):
        raise InferenceError(
            f"ckpt={path}: no tokenizer.json or tokenizer.model, so it cannot be used to chat"
        )
    return path


def load_model(
    ckpt: Any, device: str | None = "auto", dtype: str | None = "auto"
) -> tuple[MusicFlamingo, MusicFlamingoProcessor]:
    """Checked folder -> (model in eval mode on `device`, processor)."""
    path = check_checkpoint_dir(ckpt)
    dev, dt = resolve_device_dtype(device, dtype, load_config(path).num_parameters())
    processor = MusicFlamingoProcessor.from_pretrained(path)
    t0 = time.perf_counter()
    model = MusicFlamingo.from_pretrained(path, dtype=dt, device=dev).eval()
    logger.info(
        "loaded %s (%s, %s) in %.1f s", path, dev, str(dt).replace("torch.", ""), time.perf_counter() - t0
    )
    return model, processor


def stop_token_ids(ckpt: Path | None, model: MusicFlamingo) -> list[int]:
    """`eos_token_id` of `generation_config.json` (int or list) plus the model config's eos."""
    ids: list[int] = []
    gen_file = Path(ckpt) / "generation_config.json" if ckpt is not None else None
    if gen_file is not None and gen_file.is_file():
        try:
            eos = json.loads(gen_file.read_text(encoding="utf-8")).get("eos_token_id")
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{gen_file}: invalid JSON ({e})") from None
        ids += [eos] if isinstance(eos, int) else list(eos or [])
    if model.config.text.eos_token_id is not None:
        ids.append(model.config.text.eos_token_id)
    return sorted(set(int(i) for i in ids))


# ---------------------------------------------------------------------------------------------- streaming text
class IncrementalDecoder:
    """Token ids in, printable text deltas out, never splitting a multi-byte character.

    Decodes a short window `ids[prefix:]` and emits what it adds to `ids[prefix:read]` (the vLLM scheme): the
    window keeps a little left context so SentencePiece's leading-space rule and byte-level BPE pieces of one
    character decode right; a trailing U+FFFD means an incomplete character, so nothing is emitted yet.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character is emitted as U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        before = self.tokenizer.decode(self.ids[self.prefix : self.read], self.skip)
        after = self.tokenizer.decode(self.ids[self.prefix :], self.skip)
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""


# ---------------------------------------------------------------------------------------------- batch inference
def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, Path)):
        return [str(value)]
    return [str(v) for v in value]


def _check_audio_files(files: Sequence[str]) -> None:
    for f in files:
        p = Path(f).expanduser()
        if not p.exists():
            raise AudioError(f"{f}: audio file not found")
        if not p.is_file():
            raise AudioError(f"{f}: not a regular file")


def user_message(text: str, audio: str | None = None) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "audio", "path": audio}] if audio is not None else []
    return {"role": "user", "content": content + [{"type": "text", "text": text}]}


def _conversation(text: str, audio: str | None, system_prompt: str | None) -> list[dict[str, Any]]:
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return system + [user_message(text, audio)]


def generate_batch(
    model: MusicFlamingo,
    processor: MusicFlamingoProcessor,
    conversations: Sequence[list[dict[str, Any]]],
    labels: Sequence[str],
    options: GenerationOptions,
    stops: Sequence[int],
    out: TextIO | None = None,
    stream: bool = True,
) -> list[str]:
    """Generate one answer per conversation in one batch; print them labelled to `out` (None: silent).

    Row 0 streams live when `stream`; other rows print, whole, as they finish (rows that finish while row 0 is
    still streaming wait for it, so outputs never interleave). Returns the decoded answers (no special tokens).
    """
    inputs = processor.apply_chat_template(list(conversations))
    B, S = inputs["input_ids"].shape
    max_new = options.max_new_tokens
    limit = model.config.text.max_position_embeddings
    if S + max_new > limit:
        max_new = max(1, limit - S)
        logger.warning("prompt is %d tokens: max_new_tokens lowered to %d (context %d)", S, max_new, limit)
    tok = processor.tokenizer
    rows: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    printed = [False] * B
    live = IncrementalDecoder(tok) if (stream and out is not None) else None

    def emit(i: int) -> None:
        if out is not None and not printed[i]:
            printed[i] = True
            out.write(f"== {labels[i]} ==\n{tok.decode(rows[i])}\n")
            out.flush()

    if live is not None:
        out.write(f"== {labels[0]} ==\n")
        out.flush()
    t0, n_tokens = time.perf_counter(), 0
    stop_set = set(int(s) for s in stops)
    steps = model.stream_generate(
        **inputs,
        max_new_tokens=max_new,
        do_sample=options.do_sample,
        temperature=options.temperature,
        top_k=options.top_k,
        top_p=options.top_p,
        generator=options.generator(model.device),
        stop_token_ids=list(stops),
        compile=bool(options.compile),
    )
    for step in steps:
        for i, t in enumerate(step.tolist()):
            if done[i]:
                continue
            n_tokens += 1
            if t in stop_set:
                done[i] = True
                continue
            rows[i].append(t)
            if i == 0 and live is not None:
                out.write(live.push(t))
                out.flush()
        if live is not None and not printed[0] and done[0]:
            out.write(live.flush() + "\n")
            printed[0] = True
        if printed[0] or live is None:
            for i in range(B):
                if done[i]:
                    emit(i)
    if live is not None and not printed[0]:
        out.write(live.flush() + "\n")
        printed[0] = True
    for i in range(B):
        emit(i)
    dt = time.perf_counter() - t0
    logger.info("%d rows, %d new tokens in %.2f s (%.1f tokens/s)", B, n_tokens, dt, n_tokens / max(dt, 1e-9))
    return [tok.decode(r) for r in rows]


# ---------------------------------------------------------------------------------------------- chat
class ChatSession:
    """A multi-turn conversation over one growing KV cache (batch of 1).

    State: `ids` are the tokens whose keys/values are in `cache` (positions `0..len(ids)-1`); `pending` is the
    last sampled token, not fed yet. A new user turn feeds `pending` + the turn's tokens (with the closing
    `<|im_end|>` of the previous answer when it was cut by `max_new_tokens`) at positions continuing the cache, so
    `history_ids` is exactly the token sequence a from-scratch run over the whole conversation would see.
    """

    def __init__(
        self,
        model: MusicFlamingo,
        processor: MusicFlamingoProcessor,
        options: GenerationOptions | None = None,
        stop_token_ids: Sequence[int] | None = None,
        system_prompt: str | None = None,
    ) -> None:
        self.model = model
        self.processor = processor
        self.options = options or GenerationOptions()
        eos = model.config.text.eos_token_id
        self.stops = list(stop_token_ids) if stop_token_ids is not None else ([] if eos is None else [eos])
        self.system_prompt = system_prompt
        self.end_of_turn_id = processor.tokenizer.require_id(END_OF_TURN)
        self.generator = self.options.generator(model.device)
        self.cache: KVCache | None = None
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the cache buffers are kept for reuse)."""
        self.messages: list[dict[str, Any]] = (
            [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        )
        self.ids: list[int] = []
        self.pending: list[int] = []
        self.last_new_ids: list[int] = []
        if self.cache is not None:
            self.cache.reset()

    @property
    def history_ids(self) -> list[int]:
        """Every token of the conversation so far, the last answer included."""
        return self.ids + self.pending

    def _turn_text(self, message: dict[str, Any]) -> str:
        """Rendered text of the new user turn (plus the generation prompt) that follows the history."""
        full = self.processor.render_chat(self.messages + [message], add_generation_prompt=True)
        if not self.ids and not self.pending:
            return full
        before = self.processor.render_chat(self.messages, add_generation_prompt=False)
        if not full.startswith(before):  # the template must render conversations as a prefix-stable string
            raise RuntimeError("chat template is not prefix-stable; cannot continue the cached conversation")
        # The history ids end with the answer's tokens; the template closes the turn with "<|im_end|>\n".
        closing = "\n" if self.pending[-1:] == [self.end_of_turn_id] else END_OF_TURN + "\n"
        return closing + full[len(before) :]

    def _ensure_capacity(self, needed: int) -> KVCache:
        model = self.model
        if self.cache is not None and self.cache.max_length >= needed:
            return self.cache
        size = max(needed, 2 * self.cache.max_length if self.cache is not None else 0)
        size = min(max(size, needed), model.config.text.max_position_embeddings)
        new = KVCache.for_config(model.config.text, 1, size, model.dtype, model.device)
        if self.cache is not None and self.cache.length:
            n = self.cache.length
            new.keys[:, :, :, :n] = self.cache.keys[:, :, :, :n]
            new.values[:, :, :, :n] = self.cache.values[:, :, :, :n]
            new.length = n
        self.cache = new
        return new

    @torch.inference_mode()
    def ask(self, text: str, audio: str | None = None, on_text: Callable[[str], None] | None = None) -> str:
        """Add a user turn (optionally with an audio file), generate the answer, return its text.

        `on_text` receives the answer's text deltas as they are generated (see `IncrementalDecoder`).
        """
        model, processor, opts = self.model, self.processor, self.options
        if audio is not None:
            _check_audio_files([audio])
        message = user_message(text, audio)
        batch = processor(self._turn_text(message), audio=[audio] if audio is not None else None)
        feed = self.pending + batch["input_ids"][0].tolist()
        past = len(self.ids)
        limit = model.config.text.max_position_embeddings
        if past + len(feed) >= limit:
            raise InferenceError(
                f"the conversation would be {past + len(feed)} tokens, over the model's context of {limit}; "
                "start a new one (/reset)"
            )
        max_new = min(opts.max_new_tokens, limit - past - len(feed))
        cache = self._ensure_capacity(past + len(feed) + max_new)
        assert cache.length == past, (cache.length, past)
        device = model.device
        features = batch.get("input_features")
        out = model(
            torch.tensor([feed], device=device),
            input_features=features.to(device) if features is not None else None,
            input_features_mask=(batch["input_features_mask"].to(device) if features is not None else None),
            position_ids=torch.arange(past, past + len(feed), device=device)[None],
            cache=cache,
            logits_to_keep=1,
        )
        self.ids += feed
        self.pending = []
        decoder = IncrementalDecoder(processor.tokenizer)
        new: list[int] = []
        while True:
            logits = out.logits[:, -1].float()
            tok = int(
                sample_next(logits, opts.do_sample, opts.temperature, opts.top_k, opts.top_p, self.generator)
            )
            new.append(tok)
            if tok in self.stops or len(new) == max_new:
                break
            if on_text is not None:
                on_text(decoder.push(tok))
            pos = len(self.ids)
            out = model(
                torch.tensor([[tok]], device=device),
                position_ids=torch.tensor([[pos]], device=device),
                cache=cache,
                logits_to_keep=1,
            )
            self.ids.append(tok)
        if on_text is not None:
            if tok not in self.stops:
                decoder.push(tok)
            on_text(decoder.flush())
        self.pending = [tok]
        self.last_new_ids = new
        answer_ids = new[:-1] if tok in self.stops else new
        answer = processor.tokenizer.decode(answer_ids)
        self.messages += [message, {"role": "assistant", "content": answer}]
        return answer


def _stdin_lines(prompt: str = "you> ") -> Iterator[str]:
    if sys.stdin.isatty():
        while True:
            try:
                yield input(prompt)
            except EOFError:
                return
    else:
        for line in sys.stdin:
            yield line.rstrip("\n")


def run_chat(
    session: ChatSession,
    lines: Iterable[str],
    audio: str | None = None,
    out: TextIO | None = None,
) -> list[str]:
    """Drive `session` from `lines` (stdin by default): `/audio PATH` attaches a file to the next message,
    `/reset` starts again (with the initial audio), `/quit` or end of input stops. Returns the answers."""
    out = out if out is not None else sys.stdout
    attach = audio
    answers: list[str] = []
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        if line in ("/quit", "/exit", "/q"):
            break
        if line == "/reset":
            session.reset()
            attach = audio
            out.write("(new conversation)\n")
            continue
        if line.startswith("/audio"):
            path = line[len("/audio") :].strip()
            try:
                _check_audio_files([path] if path else ["(no path given)"])
            except AudioError as e:
                out.write(f"error: {e}\n")
                continue
            attach = path
            out.write(f"(attached {path} to the next message)\n")
            continue
        out.write("assistant> ")
        out.flush()

        def show(delta: str) -> None:
            out.write(delta)
            out.flush()

        try:
            answers.append(session.ask(line, audio=attach, on_text=show))
        except USER_ERRORS as e:
            out.write(f"\nerror: {e}\n")
            continue
        attach = None  # the audio now lives in the cache
        out.write("\n")
        out.flush()
    return answers


# ---------------------------------------------------------------------------------------------- entry point
def infer(cfg: Mapping[str, Any], lines: Iterable[str] | None = None, out: TextIO | None = None) -> list[str]:
    """Run `configs/infer.yaml`-shaped settings; returns one answer per audio file (or per chat turn).

    `lines` feeds the interactive mode (stdin when None); `out` receives the printed text (stdout when None).
    """
    out = out if out is not None else sys.stdout
    threads = cfg.get("threads")
    if threads is not None:
        if int(threads) < 1:
            raise InferenceError(f"threads must be >= 1 or null, got {threads!r}")
        torch.set_num_threads(int(threads))
    options = GenerationOptions.from_cfg(cfg)
    ckpt = check_checkpoint_dir(cfg.get("ckpt"))
    files = _as_list(cfg.get("audio"))
    prompts = _as_list(cfg.get("prompt"))
    _check_audio_files(files)
    system_prompt = cfg.get("system_prompt")
    interactive = bool(cfg.get("interactive", False))

    if interactive:
        if len(files) > 1:
            raise InferenceError(f"interactive=true takes at most one audio file, got {len(files)}: {files}")
        if len(prompts) > 1:
            raise InferenceError("interactive=true takes at most one prompt (the first question)")
        model, processor = load_model(ckpt, cfg.get("device", "auto"), cfg.get("dtype", "auto"))
        session = ChatSession(model, processor, options, stop_token_ids(ckpt, model), system_prompt)
        audio = files[0] if files else None
        if lines is None:
            lines = _stdin_lines()
            logger.info("chat: type a question; /audio PATH, /reset, /quit (or end of input)")
        return run_chat(session, [*prompts, *lines] if prompts else lines, audio=audio, out=out)

    if not prompts:
        prompts = [DEFAULT_PROMPT]
    if not files:
        raise InferenceError("audio is not set: pass audio=song.mp3 or audio=[a.mp3,b.wav]")
    if len(prompts) not in (1, len(files)):
        raise InferenceError(
            f"got {len(prompts)} prompts for {len(files)} audio files: give one prompt for all or one per file"
        )
    if len(prompts) == 1:
        prompts = prompts * len(files)
    batch_size = cfg.get("batch_size") or len(files)
    if int(batch_size) < 1:
        raise InferenceError(f"batch_size must be >= 1 or null, got {batch_size!r}")
    model, processor = load_model(ckpt, cfg.get("device", "auto"), cfg.get("dtype", "auto"))
    stops = stop_token_ids(ckpt, model)
    texts: list[str] = []
    with torch.inference_mode():
        for start in range(0, len(files), int(batch_size)):
            chunk = range(start, min(start + int(batch_size), len(files)))
            convs = [_conversation(prompts[i], files[i], system_prompt) for i in chunk]
            labels = [files[i] for i in chunk]
            texts += generate_batch(
                model, processor, convs, labels, options, stops, out, stream=bool(cfg.get("stream", True))
            )
    return texts
