"""Server settings: `configs/serve.yaml` -> a checked `ServeSettings` (bad values name the setting)."""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

API_KEY_ENV = "MUSICFLAMINGO_API_KEY"


class ServeConfigError(ValueError):
    """A server setting with a bad value (the message names the setting and the value)."""


@dataclass
class ServeSettings:
    """Everything the app needs besides the model (see `configs/serve.yaml` for what each setting means).

    `None` limits are filled from the model by `resolve`: `max_audio_seconds` from the processor's
    `max_audio_len`, `max_prompt_tokens` and `max_completion_tokens` from the context length.
    """

    model_name: str = "music-flamingo"
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    audio_root: str | None = None
    max_batch: int = 8
    max_cached_tokens: int | None = None
    max_queue: int = 64
    retry_after_s: int = 1
    prepare_threads: int = 4
    max_body_mb: float = 64.0
    max_audio_seconds: float | None = None
    max_prompt_tokens: int | None = None
    max_completion_tokens: int | None = None
    default_max_tokens: int = 1024
    shutdown_grace_s: float = 5.0
    compile: bool = False
    # web pages of other origins that may call the API from a browser (CORS); None: the server's own page only
    cors_origins: list[str] | None = None

    def __post_init__(self) -> None:
        def positive(name: str, allow_none: bool = False, cast: type = int) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            ok = not isinstance(v, bool) and isinstance(v, (int, float) if cast is float else int)
            if not ok or not math.isfinite(v) or v <= 0:  # nan passed `v <= 0` and turned a limit off
                need = "a number > 0" if cast is float else "an integer >= 1"
                raise ServeConfigError(f"{name} must be {need}{' or null' if allow_none else ''}, got {v!r}")

        for name in ("max_batch", "max_queue", "retry_after_s", "prepare_threads", "default_max_tokens"):
            positive(name)
        for name in ("max_cached_tokens", "max_prompt_tokens", "max_completion_tokens"):
            positive(name, allow_none=True)
        if self.compile and self.max_cached_tokens is not None and self.max_cached_tokens < self.max_batch:
            # a compiled engine keeps a cache row for every slot: each gets max_cached_tokens / max_batch positions
            raise ServeConfigError(
                f"max_cached_tokens={self.max_cached_tokens} is under max_batch={self.max_batch}: with compile=true "
                "every slot keeps its cache row, so no row would have a position"
            )
        positive("max_body_mb", cast=float)
        positive("max_audio_seconds", allow_none=True, cast=float)
        g = self.shutdown_grace_s
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g < 0:
            raise ServeConfigError(f"shutdown_grace_s must be a number >= 0 (seconds), got {g!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ServeConfigError(f"port must be an integer in 0..65535, got {self.port!r}")
        if not isinstance(self.host, str) or not self.host.strip():  # `host=` bound every interface
            raise ServeConfigError(
                f"host must be an address or host name (127.0.0.1: this machine only; 0.0.0.0: every interface), "
                f"got {self.host!r}"
            )
        if not isinstance(self.model_name, str) or not self.model_name.strip():
            raise ServeConfigError(f"model_name must be a non-empty string, got {self.model_name!r}")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise ServeConfigError("api_key must be a non-empty string or null")
        if self.cors_origins is not None:
            self.cors_origins = _origins(self.cors_origins)
        if self.audio_root is not None:
            root = Path(str(self.audio_root)).expanduser()
            if not root.is_dir():
                raise ServeConfigError(f"audio_root={self.audio_root} is not a folder")
            self.audio_root = str(root.resolve())

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def loopback(self) -> bool:
        """Whether `host` only accepts connections from this machine."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def resolve(self, context: int, max_audio_len: float) -> ServeSettings:
        """Fill the `None` limits from the model (context length in tokens, longest audio in seconds) and check
        the given ones against it."""
        if self.max_audio_seconds is None:
            self.max_audio_seconds = float(max_audio_len)
        elif self.max_audio_seconds > max_audio_len:
            raise ServeConfigError(
                f"max_audio_seconds={self.max_audio_seconds} is over the model's limit of {max_audio_len} s "
                "(longer audio would be cut)"
            )
        if self.max_prompt_tokens is None:
            self.max_prompt_tokens = context - 1
        if self.max_completion_tokens is None:
            self.max_completion_tokens = context - 1
        if self.max_prompt_tokens >= context:
            raise ServeConfigError(
                f"max_prompt_tokens={self.max_prompt_tokens} must be below the model's context of {context}"
            )
        return self

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any]) -> ServeSettings:
        """The settings of a `configs/serve.yaml`-shaped mapping; `api_key` falls back to the environment
        variable named by `api_key_env` (default MUSICFLAMINGO_API_KEY)."""
        known = {f.name for f in fields(cls)}
        values = {k: cfg[k] for k in known if k in cfg and cfg[k] is not None}
        if "api_key" not in values:
            env = str(cfg.get("api_key_env") or API_KEY_ENV)  # (api_key_env=5: a TypeError in os.environ)
            if os.environ.get(env):
                values["api_key"] = os.environ[env]
        for name in ("model_name", "api_key", "audio_root", "host"):
            if name in values:
                values[name] = str(values[name])
        origins = values.get("cors_origins")
        if (
            origins is not None
            and not isinstance(origins, (str, list, tuple))
            and hasattr(origins, "__iter__")
        ):
            values["cors_origins"] = list(origins)  # Hydra's ListConfig
        return cls(**values)


def _origins(value: Any) -> list[str]:
    """`cors_origins`: a list of origins as a browser sends them (`scheme://host[:port]`: no path, no trailing
    slash, which no browser's `Origin` header has, so such an entry would never match) or `"*"`, any page."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise ServeConfigError(
            f"cors_origins must be a list of origins such as [http://localhost:3000], or '*', got {value!r}"
        )
    for item in items:
        if item != "*" and not (isinstance(item, str) and _ORIGIN.fullmatch(item)):
            raise ServeConfigError(
                f"cors_origins: {item!r} is not an origin: scheme://host[:port], as http://localhost:3000 "
                "(no path, no trailing slash), or '*'"
            )
    return [str(item) for item in items]


_ORIGIN = re.compile(r"https?://(\[[0-9a-fA-F:.]+\]|[^/\s:\[\]]+)(:\d{1,5})?")
