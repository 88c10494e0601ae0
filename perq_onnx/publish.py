"""Every file perq-onnx writes (the model, its external data and sidecar files, the --report)
goes through here:

* ``check_outputs``: before any work, each output path is refused (one line naming the option,
  the path and the reason) when it is or would replace a file of the input model, is another
  output's path, is a directory or not a regular file, lies below a file, or has a name the
  file system cannot hold (with the ``.data`` file beside it).
* ``staging``: the outputs are written into a hidden staging directory beside them (same file
  system, so that publishing is a rename), named ``.perq<pid>.<random>`` (short: a 250-byte
  output name still fits) and holding an ``owner`` file with the process's pid and start time.
  It is removed on the way out, whatever happens (with signals held, so that a second Ctrl-C
  during cleanup cannot leave it half removed), and a later run in the same directory removes
  those whose process is gone (SIGKILL, power loss).
* ``move``: the renames that publish the outputs, with terminating signals held (delivered
  right after), sidecar and data files first, the model last.
* ``install_handlers``: every signal that would end the process (SIGHUP, SIGQUIT, SIGUSR1, ...)
  unwinds like Ctrl-C (``Interrupted``), so the staging directory is removed on the way out.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import re
import secrets
import shutil
import signal
from dataclasses import dataclass
from typing import Iterable, Iterator

from .errors import PerqError

PREFIX = ".perq"
OWNER = "owner"
_STAGING_NAME = re.compile(r"^\.perq(\d+)\.[0-9a-f]{8}$")
DATA_SUFFIX = ".data"

# signals whose default action ends the process (SIGKILL/SIGSTOP cannot be caught)
TERMINATING = tuple(getattr(signal, name) for name in (
    "SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM", "SIGVTALRM", "SIGPROF",
    "SIGXCPU", "SIGPWR", "SIGIO") if hasattr(signal, name))


class Interrupted(KeyboardInterrupt):
    """A terminating signal, turned into an exception that unwinds like Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


def _interrupt(signum, frame):
    raise Interrupted(signum)


def install_handlers() -> None:
    """Make every catchable terminating signal raise Interrupted (main thread only)."""
    for sig in TERMINATING:
        with contextlib.suppress(ValueError, OSError):  # not the main thread, or not settable
            if signal.getsignal(sig) is not signal.SIG_IGN:  # keep nohup's SIGHUP ignored
                signal.signal(sig, _interrupt)


@contextlib.contextmanager
def held_signals():
    """Hold every terminating signal for a few file operations that must not be cut in half
    (publishing renames, removing the staging directory); they are delivered right after."""
    held, received = {}, []
    for sig in TERMINATING:
        try:
            previous = signal.getsignal(sig)
            if previous is signal.SIG_IGN or previous is None:
                continue
            held[sig] = signal.signal(sig, lambda number, frame: received.append(number))
        except (ValueError, OSError):  # not the main thread: nothing to hold
            pass
    try:
        yield
    finally:
        for sig, handler in held.items():
            signal.signal(sig, handler)
        for number in dict.fromkeys(received):
            signal.raise_signal(number)


# ------------------------------------------------------------------------------ path checks

@dataclass(frozen=True)
class Output:
    """A file the tool will write, named by its option; companions are written with it (the
    model's external data file)."""
    option: str
    path: pathlib.Path
    companions: tuple[pathlib.Path, ...] = ()

    @classmethod
    def model(cls, path, option: str = "-o") -> "Output":
        path = pathlib.Path(path)
        return cls(option, path, (path.parent / (path.name + DATA_SUFFIX),))


def _name_max(directory: pathlib.Path) -> int:
    for p in [directory, *directory.parents]:
        if p.is_dir():
            with contextlib.suppress(OSError, ValueError):
                return os.pathconf(p, "PC_NAME_MAX")
            break
    return 255


def _same_file(a: pathlib.Path, b: pathlib.Path) -> bool:
    try:
        return a.resolve() == b.resolve() or os.path.samefile(a, b)
    except OSError:
        return False


def check_outputs(outputs: Iterable[Output], inputs: Iterable[pathlib.Path] = ()) -> None:
    """Refuse, before any work, every output path that would lose or damage data (see the
    module docstring). `inputs`: the input model and the files its weights are read from."""
    outputs = [o for o in outputs if o.path is not None]
    inputs = [pathlib.Path(p) for p in inputs]
    written: dict[pathlib.Path, str] = {}
    for out in outputs:
        path = pathlib.Path(out.path)
        where = f"{out.option} {path}"
        if str(out.path) == "" or path.name in ("", ".", ".."):
            raise PerqError(f"{where}: not a file name")
        if path.is_dir():
            raise PerqError(f"{where}: is a directory; give a file name such as {path / 'model.onnx'}")
        if path.exists() and not path.is_file():
            raise PerqError(f"{where}: exists and is not a regular file (a device, pipe or socket); "
                            "perq-onnx replaces its output files, give a file name")
        longest = max(len(p.name.encode()) for p in (path, *out.companions))
        limit = _name_max(path.parent)
        if longest > limit:
            extra = f" (with its external data file {path.name}{DATA_SUFFIX})" if out.companions else ""
            raise PerqError(f"{where}: the file name is too long for the file system{extra}: "
                            f"{longest} bytes, at most {limit}")
        for p in [path.parent, *path.parent.parents]:
            if p.exists():
                if not p.is_dir():
                    raise PerqError(f"{where}: {p} is a file, not a directory")
                if not os.access(p, os.W_OK | os.X_OK):
                    raise PerqError(f"{where}: cannot write in {p} (permission denied)")
                break
        for p in (path, *out.companions):
            for source in inputs:
                if _same_file(p, source):
                    what = "the input model" if source == inputs[0] else f"one of its inputs ({source})"
                    raise PerqError(f"{where}: would overwrite {what}; perq-onnx never overwrites its input")
            key = p.resolve()
            if key in written:
                raise PerqError(f"{where}: is also {written[key]}; give each output its own path")
            written[key] = f"the {out.option} file" if p == path else f"{out.option}'s {p.name} (written with it)"


# --------------------------------------------------------------------------------- staging

def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (None: no such process)."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except OSError:
            pass
        return "?"  # alive (or not ours to ask) but no /proc: treat as running
    return stat.rsplit(")", 1)[1].split()[19]


def _owner_gone(entry: pathlib.Path, pid: int) -> bool:
    if pid == os.getpid():
        return False
    started = _start_time(pid)
    if started is None:
        return True
    try:
        recorded = (entry / OWNER).read_text().split()
    except OSError:
        return False  # its owner is alive and still creating it
    return len(recorded) == 2 and recorded[1] != started and started != "?"


def remove_stale(directory: pathlib.Path) -> list[pathlib.Path]:
    """Remove the staging directories in `directory` whose process is gone (killed by SIGKILL,
    a crash or a power loss); returns them."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in pathlib.Path(directory).iterdir():
            m = _STAGING_NAME.match(entry.name)
            if m and entry.is_dir() and not entry.is_symlink() and _owner_gone(entry, int(m.group(1))):
                _remove(entry)
                removed.append(entry)
    return removed


def _remove(path: pathlib.Path) -> None:
    try:
        with held_signals():
            shutil.rmtree(path, ignore_errors=True)
    finally:  # an interrupt that landed before the signals were held: remove it anyway
        shutil.rmtree(path, ignore_errors=True)


def _missing_parents(directory: pathlib.Path) -> list[pathlib.Path]:
    return [p for p in [directory, *directory.parents] if not p.exists()]


@contextlib.contextmanager
def staging(directory) -> Iterator[pathlib.Path]:
    """A fresh staging directory in `directory` (created with its parents when missing; those
    are removed again, when empty, if the work fails), removed on the way out."""
    directory = pathlib.Path(directory)
    created = _missing_parents(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = None
    try:
        remove_stale(directory)
        with held_signals():  # a signal that arrives meanwhile is raised at the end of this block
            while path is None:
                candidate = directory / f"{PREFIX}{os.getpid()}.{secrets.token_hex(4)}"
                with contextlib.suppress(FileExistsError):
                    candidate.mkdir()
                    path = candidate
            (path / OWNER).write_text(f"{os.getpid()} {_start_time(os.getpid())}\n")
        yield path
    except BaseException:
        if path is not None:
            _remove(path)
        _remove_empty(created)
        raise
    _remove(path)


def _remove_empty(directories: list[pathlib.Path]) -> None:
    for d in directories:  # deepest first
        with contextlib.suppress(OSError):
            d.rmdir()


def move(moves: Iterable[tuple[pathlib.Path, pathlib.Path]]) -> None:
    """Publish staged files by renaming them onto their destinations, with terminating signals
    held (give the model file last: a reader never sees it without its data)."""
    with held_signals():
        for src, dst in moves:
            os.replace(src, dst)


def write_text(path, text: str) -> None:
    """Write a text file atomically (staged beside it, then renamed)."""
    path = pathlib.Path(path)
    with staging(path.parent) as tmp:
        staged = tmp / path.name
        staged.write_text(text)
        move([(staged, path)])
