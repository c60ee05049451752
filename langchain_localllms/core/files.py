"""Model files: path checks before native code runs, and the cache that builds once.

Every conversion, export and build is made once into :func:`cache_root`, with
:func:`build_once`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def model_file(path: str | os.PathLike[str], *, kind: str, magic: bytes | None = None) -> Path:
    """Return ``path`` as a Path if it is a readable model file, else raise a clear error.

    Args:
        path: The model file the user gave.
        kind: What it should be, for messages (e.g. ``"GGUF model"``).
        magic: The bytes the file must start with, if the format has them.

    Raises:
        FileNotFoundError: nothing at ``path``.
        IsADirectoryError: ``path`` is a directory.
        ValueError: the file is empty or not of this format.
    """
    p = Path(path).expanduser()
    if not p.exists():
        msg = f"{kind} file not found: {p}. Check the path (it is resolved from {Path.cwd()})."
        raise FileNotFoundError(msg)
    if p.is_dir():
        msg = f"{p} is a directory; give the path of the {kind} file inside it."
        raise IsADirectoryError(msg)
    if magic is not None:
        with p.open("rb") as f:
            head = f.read(len(magic))
        if head != magic:
            what = "empty" if not head else f"not a {kind} (it starts with {head!r}, not {magic!r})"
            msg = f"{p} is {what}. Re-download or re-convert the model."
            raise ValueError(msg)
    return p


def model_dir(path: str | os.PathLike[str], *, kind: str, must_have: tuple[str, ...]) -> Path:
    """Return ``path`` if it is a directory holding a model of this kind, else raise."""
    p = Path(path).expanduser()
    if not p.exists():
        msg = f"{kind} directory not found: {p}. Check the path (it is resolved from {Path.cwd()})."
        raise FileNotFoundError(msg)
    if not p.is_dir():
        msg = f"{p} is a file; give the {kind} directory."
        raise NotADirectoryError(msg)
    missing = [name for name in must_have if not (p / name).is_file()]
    if missing:
        msg = f"{p} is not a {kind} directory: it has no {', '.join(missing)}."
        raise ValueError(msg)
    return p


def cpu_count() -> int:
    """CPUs this process may run on (what a runtime's thread count should default to)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def progress(message: str, *, show: bool = True) -> None:
    """Tell the user about slow one-time work: a log record, and a line on a terminal.

    Nothing is printed when stderr is not a terminal (CI, logs): the log record stays.
    """
    logging.getLogger("langchain_localllms").info(message)
    if show and _on_terminal():
        sys.stderr.write(f"[langchain-localllms] {message}\n")
        sys.stderr.flush()


def _on_terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


@contextlib.contextmanager
def working(description: str, *, show: bool = True) -> Iterator[None]:
    """A progress bar that counts the seconds of work that reports no steps of its own.

    For a conversion, an export or a build: the bar ticks while the block runs, on a
    terminal only (tqdm's ``disable=None``); the start and the time taken are logged.
    """
    log = logging.getLogger("langchain_localllms")
    log.info("%s ...", description)
    began = time.perf_counter()
    bar = progress_bar(description, unit="s", disable=None if show else True)
    bar.bar_format = "{desc}: {elapsed}"
    done = threading.Event()

    def tick() -> None:
        while not done.wait(0.5):
            bar.refresh()

    ticker = threading.Thread(target=tick, name="progress", daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()
        bar.close()
        log.info("%s: done in %.1fs", description, time.perf_counter() - began)


def progress_bar(
    description: str, *, total: float | None = None, unit: str = "it", **options: Any
) -> Any:
    """A tqdm bar for slow one-time work (a pull, a conversion, an export).

    It shows on a terminal and stays quiet when stderr is not one (CI, logs): tqdm's
    own ``disable=None`` convention. ``unit="B"`` counts bytes (scaled to kB, MB, ...).
    """
    from tqdm.auto import tqdm

    if unit == "B":
        options = {"unit_scale": True, "unit_divisor": 1024, **options}
    options.setdefault("disable", None)
    return tqdm(total=total, desc=description, unit=unit, **options)


def cache_root(*parts: str) -> Path:
    """Where built things are kept, joined with ``parts``.

    ``$LOCALLLMS_CACHE`` when it is set and not empty, else ``~/.cache/langchain-localllms``.
    """
    base = os.environ.get("LOCALLLMS_CACHE") or Path.home() / ".cache" / "langchain-localllms"
    return Path(base).expanduser().joinpath(*parts)


def build_once(
    target: Path,
    build: Callable[[Path], None],
    *,
    ready: Callable[[Path], bool],
    force: bool = False,
) -> Path:
    """Make ``target`` with ``build(tmp)`` unless ``ready(target)``; return ``target``.

    ``build`` writes into a fresh temporary directory beside ``target``, which then
    takes its place in one rename: an interrupted or failed build leaves nothing that
    ``ready`` would accept, and of two processes building at once, the first to
    finish wins and the other uses its result.
    """
    if ready(target) and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        build(tmp)
        if force:
            shutil.rmtree(target, ignore_errors=True)
        try:
            tmp.rename(target)
        except OSError:
            if not ready(target):  # not another process finishing first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
