"""One process at a time in an output folder, and the temporary files of writes killed midway: train.py's
`run.lock`, eval.py's `eval.lock` and infer.py's `<output>.lock`; the run's `.hydra/` config and Hydra's job log,
written only once the lock is held. Plain Python (eval.py imports it without Lightning; Hydra and OmegaConf are
imported where used)."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# `.<name>.<random>.tmp`: the temporary file of `checkpoint.replace_file` / `checkpoint.atomic_torch_save`
# (mkstemp's 8 characters)
_TEMP_FILE = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


class FolderInUseError(ValueError):
    """Another live process holds the folder's lock (the message names its pid)."""


class FolderLock:
    """`<folder>/<name>`: the pid, host and start time of the process that uses the folder, under an exclusive
    `flock` held for its lifetime.

    The kernel drops the `flock` when its process ends however it ends (`SIGKILL` included), so a lock file nobody
    holds is stale by definition, with no pid liveness guess and no race between two processes taking it over: the
    next one takes it with a warning naming the dead one's pid. A second process while the first lives is refused
    (`error`, naming `tool` and the first one's pid, then `advice`). A file system without `flock` (some Lustre
    mounts) runs unlocked, with a warning. The lock file is removed on a clean exit.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        name: str,
        tool: str,
        advice: str,
        error: type[Exception] = FolderInUseError,
        subject: str | os.PathLike | None = None,
    ) -> None:
        self.path = Path(folder) / name
        self.tool, self.advice, self.error = tool, advice, error
        self.subject = str(subject) if subject is not None else str(self.path.parent)  # what is in use
        self._fd: int | None = None

    @property
    def locked(self) -> bool:
        return self._fd is not None

    def acquire(self) -> FolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_owner(fd)
                os.close(fd)
                raise self.error(
                    f"{self.subject} is in use by another {self.tool} (pid {owner.get('pid', '?')} on "
                    f"{owner.get('host', '?')}, since {owner.get('since', '?')}; lock {self.path}): wait for it to "
                    f"end, or {self.advice}"
                ) from None
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                log.warning(
                    "%s: cannot lock (%s): nothing stops a second %s writing here", self.path, e, self.tool
                )
                return self
            try:  # the file we locked must still be the one at the path (not unlinked by a process that just ended)
                if os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                    raise FileNotFoundError
            except FileNotFoundError:
                os.close(fd)
                continue
            stale = _read_owner(fd)
            if stale.get("pid") not in (None, os.getpid()):
                log.warning(
                    "%s: taking over the lock of pid %s (%s), which is no longer running",
                    self.path,
                    stale.get("pid"),
                    stale.get("host", "?"),
                )
            owner = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
            self._fd = fd
            return self
        raise self.error(f"{self.path}: could not take the folder's lock (it keeps changing hands)")

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # while still locked: nobody can take a file that is going away
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_owner(fd: int) -> dict[str, Any]:
    try:
        owner = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def remove_interrupted_writes(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that writes killed midway (`atomic_torch_save`, `replace_file`) left in `folder`;
    returns them. Only for a folder no other process writes to (one whose `FolderLock` is held): a running write's
    temporary file has the same form. A killed checkpoint write leaves up to a whole checkpoint's bytes (the
    weights and the optimizer states), and a job preempted again and again while saving would fill the disk."""
    folder = Path(folder)
    removed = []
    try:
        entries = sorted(folder.iterdir())
    except FileNotFoundError:
        return []
    for entry in entries:
        if not _TEMP_FILE.fullmatch(entry.name) or not entry.is_file() or entry.is_symlink():
            continue
        size = entry.stat().st_size
        entry.unlink(missing_ok=True)
        removed.append(entry)
        log.warning(
            "%s: removed %s (%.1f MB), the temporary file of a write an earlier run was killed in",
            folder,
            entry.name,
            size / 2**20,
        )
    return removed


def save_run_config(cfg: Any, folder: str | os.PathLike) -> None:
    """`<folder>/.hydra/config.yaml` (+ `overrides.yaml`, `hydra.yaml` under Hydra), written by us once the folder's
    lock is held: Hydra itself would write them before the task starts, over the config of a run still using the
    folder (configs/hydra/default.yaml and configs/eval.yaml set `output_subdir: null`). Each file is replaced whole
    (`checkpoint.replace_file`), never left cut by a kill."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from musicflamingo.checkpoint import replace_file

    out = Path(folder) / ".hydra"
    out.mkdir(parents=True, exist_ok=True)
    remove_interrupted_writes(out)  # the lock is held: a killed earlier write's temporary files go
    files = {"config.yaml": cfg}
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        files["overrides.yaml"] = hydra_cfg.overrides.task
        files["hydra.yaml"] = OmegaConf.create({"hydra": hydra_cfg})
    for name, content in files.items():
        # through a temporary file: a kill mid-write left a cut config.yaml, the folder's only record of the
        # settings its checkpoints were trained with (the old one stays whole instead)
        replace_file(out / name, lambda tmp, content=content: OmegaConf.save(content, tmp))


class _Held(logging.Handler):
    """Keeps the records logged before the folder's lock is held, for the job log."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        record.msg, record.args = record.getMessage(), None  # as it reads now, not once its arguments changed
        self.records.append(record)


class JobLog:
    """Hydra's job log (`<run folder>/<job name>.log`: `eval.log`), written only once the folder's lock is held.

    Hydra opens the file before the task starts, so a run refused because the folder is in use (or `plan=true` into
    it) appended its lines to the running run's log. From `hold()` on, the lines go to memory instead; `write()`
    (with the lock held) writes them to the file and keeps logging there; `close()` without `write()` drops them (the
    console has them), and with `lock` (the folder's `FolderLock` for a folder) removes a log file that Hydra opened
    empty for this run (a run refused by a bad setting left an empty `eval.log` in its new folder), once it holds
    that lock: a run holding it writes its log there. Outside Hydra, or without Hydra's file handler
    (`hydra/job_logging=none`), it does nothing.
    """

    def __init__(self, lock: Callable[[str], FolderLock] | None = None) -> None:
        self._files: list[logging.FileHandler] = []
        self._held: _Held | None = None
        self._lock = lock
        self._empty: list[str] = []  # the files that were empty when held

    def hold(self) -> JobLog:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return self
        hc = HydraConfig.get()
        path = os.path.abspath(os.path.join(str(hc.runtime.output_dir), f"{hc.job.name}.log"))
        root = logging.getLogger()
        self._files = [
            h for h in root.handlers if isinstance(h, logging.FileHandler) and h.baseFilename == path
        ]
        if not self._files:
            return self
        self._held = _Held()
        root.addHandler(self._held)
        for h in self._files:
            root.removeHandler(h)
            h.close()  # opened in append mode and never written: the file is as it was
        self._empty = [h.baseFilename for h in self._files if _size(h.baseFilename) == 0]
        return self

    def write(self) -> None:
        """The lock is held: the lines so far into the file, and the next ones as they come."""
        if self._held is None:
            return
        root = logging.getLogger()
        for old in self._files:
            new = logging.FileHandler(old.baseFilename, mode="a", encoding=old.encoding)
            new.setLevel(old.level)
            new.setFormatter(old.formatter)
            for f in old.filters:
                new.addFilter(f)
            for record in self._held.records:
                new.handle(record)
            root.addHandler(new)
        self._empty = []
        self.close()

    def close(self) -> None:
        if self._held is not None:
            logging.getLogger().removeHandler(self._held)
            self._held = None
        empty, self._empty = self._empty, []
        if self._lock is not None:
            for path in empty:
                _remove_empty_log(path, self._lock)

    def __enter__(self) -> JobLog:
        return self.hold()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


def _remove_empty_log(path: str, lock: Callable[[str], FolderLock]) -> None:
    """Remove the job log `path` if it is empty and its folder's lock is free (nobody writes the log)."""
    try:
        with lock(os.path.dirname(path)) as held:
            if held.locked and _size(path) == 0:
                os.unlink(path)
    except Exception as e:  # in use (another run's log), unwritable: the file stays; the run's error goes on
        log.debug("%s: left in place (%s)", path, e)
