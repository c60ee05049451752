"""Models from the Hugging Face Hub cache, offline first.

The two questions a runtime asks of a Hub id, answered once, by ``huggingface_hub``'s
own cache code (``snapshot_download``, ``hf_hub_download``), so the cache read is the
one ``hf download``, transformers and llama-cpp-python write: ``HF_HUB_CACHE``, else
``$HF_HOME/hub``, else ``~/.cache/huggingface/hub`` (or ``cache_dir``):

* :func:`hub_file` -- the one file of a repo that a name or glob pattern matches
  (``"*Q4_K_M.gguf"``, fnmatch over the repo's paths, as
  ``llama_cpp.Llama.from_pretrained`` matches them);
* :func:`hub_snapshot` -- a whole model directory (``config.json``, weights, tokenizer).

Offline first: what the cache holds is used without asking the Hub. Only a miss goes
to the network, and not at all with ``local_files_only=True`` or ``HF_HUB_OFFLINE=1``:
then a miss is a ``FileNotFoundError`` that names the repo, the file or pattern, the
cache folder, and the ``hf download`` command that fetches it.
"""

from __future__ import annotations

import fnmatch
import os
import re
import socket
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlparse

from langchain_localllms.core.imports import require

__all__ = ["hub_file", "hub_snapshot", "is_repo_id", "match_files"]

_TRUE = ("1", "true", "yes", "on")
_GLOB = re.compile(r"[*?\[]")
_REPO_ID = re.compile(r"(?:[\w.-]+/)?[\w.-]+")
#: A split GGUF: llama.cpp loads the first part and finds the rest beside it.
_SHARD = re.compile(r"(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf")
#: Weights a model directory holds (any one kind is enough).
_WEIGHTS = (
    "*.safetensors", "*.bin", "*.pt", "*.pth", "openvino_model.xml",
    "openvino_encoder_model.xml",
)  # fmt: skip
#: Files of other formats that loading a model directory never reads: not downloaded.
_OTHER_FORMATS = (
    "*.gguf", "*.onnx", "*.onnx_data", "onnx/*", "*.h5", "*.msgpack", "*.ot", "*.tflite",
    "*.mlmodel", "coreml/*", "original/*",
)  # fmt: skip
_LISTED = 40  # files named in an error, at most
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


# ------------------------------------------------------------------- matching
def is_repo_id(name: str) -> bool:
    """Whether ``name`` reads as a Hub repo id (``org/name`` or ``name``), not a path.

    A path that exists is local; so is anything spelled like one (``./x``, ``~/x``,
    ``/x``, ``a/b/c``, a backslash).
    """
    if not name or Path(name).expanduser().exists():
        return False
    if name.startswith((".", "~")) or "--" in name or ".." in name:
        return False
    return _REPO_ID.fullmatch(name) is not None


def match_files(names: list[str], pattern: str) -> list[str]:
    """The repo paths ``pattern`` matches.

    A repo path matches itself (even one with glob characters in it); else ``fnmatch``
    decides (case-sensitive; ``*`` also crosses ``/``, as in llama-cpp-python).
    """
    if pattern in names or not _GLOB.search(pattern):
        return [n for n in names if n == pattern]
    return sorted(n for n in names if fnmatch.fnmatchcase(n, pattern))


def _listing(names: list[str]) -> str:
    if not names:
        return "no files"
    shown = ", ".join(names[:_LISTED])
    return shown + (f", ... ({len(names) - _LISTED} more)" if len(names) > _LISTED else "")


def _choose(
    names: list[str], pattern: str, repo_id: str, where: str
) -> tuple[str, list[str]] | None:
    """The file to load and every file it needs (all parts of a split GGUF).

    None: nothing matches. Several matches that are not one split GGUF: ValueError.
    """
    matches = match_files(names, pattern)
    if not matches:
        return None
    shards = [_SHARD.fullmatch(m) for m in matches]
    sets = {(s["stem"], s["count"]) for s in shards if s is not None}
    if len(matches) > 1 and (None in shards or len(sets) != 1):
        msg = (
            f"{len(matches)} files of {repo_id!r} match {pattern!r} ({where}): "
            f"{_listing(matches)}. Give a filename or a pattern that matches one of them."
        )
        raise ValueError(msg)
    if sets and None not in shards:
        stem, count = sets.pop()
        parts = [f"{stem}-{i:05d}-of-{count}.gguf" for i in range(1, int(count) + 1)]
        return parts[0], parts
    return matches[0], matches


def _no_match(names: list[str], pattern: str) -> str:
    """What a pattern failed to match, with near misses."""
    text = f"it has {_listing(names)}"
    folded = [n for n in names if fnmatch.fnmatchcase(n.lower(), pattern.lower())]
    if folded:
        text += f" (matching {pattern!r} only if case is ignored: {_listing(folded)})"
    return text


# -------------------------------------------------------------------- the hub
def _hub(feature: str, extra: str | None) -> ModuleType:
    return require("huggingface_hub", feature=feature, extra=extra)


def _offline(local_files_only: bool | None) -> str | None:
    """Why the Hub must not be asked, or None if it may be."""
    if local_files_only:
        return "local_files_only=True"
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"{var}={os.environ[var]}"
    if getattr(require("huggingface_hub.constants"), "HF_HUB_OFFLINE", False):
        return "HF_HUB_OFFLINE (set when huggingface_hub was imported)"
    return None


def _unreachable(timeout: float = 3.0) -> str | None:
    """None if the Hub answers a TCP connect within ``timeout``; else why not.

    huggingface_hub retries an unreachable Hub for about 25 s before it gives up; this
    answers in at most ``timeout``. Behind a proxy the Hub is not dialled directly, so
    there is no check.
    """
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return None
    constants = require("huggingface_hub.constants")
    endpoint = os.environ.get("HF_ENDPOINT") or str(constants.ENDPOINT)
    url = urlparse(endpoint)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return f"the Hub at {endpoint} is not reachable ({e})"


def _no_download(local_files_only: bool | None) -> str | None:
    """Why nothing can be downloaded now (the end of a sentence), or None."""
    why = _offline(local_files_only)
    if why is not None:
        return f"{why} forbids downloading it"
    why = _unreachable()
    return None if why is None else f"it cannot be downloaded now: {why}"


def _repo_cache(repo_id: str, cache_dir: str | os.PathLike[str] | None) -> Path:
    """The cache folder of a model repo (``<cache>/models--org--name``)."""
    constants = require("huggingface_hub.constants")
    file_download = require("huggingface_hub.file_download")
    root = Path(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE).expanduser()
    return root / str(file_download.repo_folder_name(repo_id=repo_id, repo_type="model"))


def _fetch(repo_id: str, revision: str | None, cache_dir: Any, pattern: str | None) -> str:
    """The ``hf download`` command that puts what is missing into the cache."""
    cmd = f"hf download {repo_id}"
    if pattern is not None:
        cmd += f" --include '{pattern}'"
    if revision is not None:
        cmd += f" --revision {revision}"
    if cache_dir is not None:
        cmd += f" --cache-dir {cache_dir}"
    return f"`{cmd}`"


def _what_is_cached(repo_cache: Path) -> str:
    """Which revisions the cache holds for a repo, for an error message."""
    if not repo_cache.is_dir():
        return "nothing of this repo is cached"
    refs = repo_cache / "refs"
    names = sorted(
        p.relative_to(refs).as_posix() for p in refs.rglob("*") if p.is_file()
    ) if refs.is_dir() else []  # fmt: skip
    snapshots = repo_cache / "snapshots"
    commits = sorted(p.name for p in snapshots.iterdir()) if snapshots.is_dir() else []
    return (
        f"the cache holds revisions {', '.join(names) or 'none by name'} and commits "
        f"{', '.join(c[:12] for c in commits) or 'none'}"
    )


def _snapshot_files(snapshot: Path) -> list[str]:
    """Paths of the files a snapshot holds (symlinks whose blob is there)."""
    return sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())


def _cached_snapshot(
    hub: ModuleType, repo_id: str, revision: str | None, cache_dir: Any, token: Any,
    patterns: dict[str, list[str]],
) -> tuple[Path | None, str | None]:  # fmt: skip
    """The cached snapshot folder of ``revision``, by ``snapshot_download`` offline.

    Returns:
        ``(folder, lacking)``: the folder (None if the revision is not cached) and,
        where huggingface_hub's listing of the commit shows files of ``patterns``
        missing from it, its words for that (else None).
    """
    errors = require("huggingface_hub.errors")
    incomplete = getattr(errors, "IncompleteSnapshotError", None)  # huggingface_hub >= 2
    try:
        folder = hub.snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True,
            token=token, **patterns,
        )  # fmt: skip
    except errors.LocalEntryNotFoundError as e:
        if incomplete is not None and isinstance(e, incomplete):
            return Path(e.snapshot_path), str(e)
        return None, None
    return Path(folder), None


def _revision(revision: str | None) -> str:
    return repr(revision or "main")


def hub_file(
    repo_id: str,
    filename: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
    feature: str = "from_pretrained",
    extra: str | None = None,
) -> Path:
    """The one file of a Hub repo that ``filename`` (a name or glob) matches.

    The cached snapshot of ``revision`` is looked at first, without the network. On a
    miss the repo's file list is fetched, matched, and the file downloaded into the
    cache, unless ``local_files_only`` or ``HF_HUB_OFFLINE`` forbids it. A match that
    is part of a split GGUF (``-00001-of-00003.gguf``) brings all its parts.

    Args:
        repo_id: ``org/name`` on the Hub.
        filename: A path in the repo, or a glob such as ``"*Q4_K_M.gguf"``.
        revision: A branch, tag or commit hash (default ``main``).
        cache_dir: The Hub cache (default: huggingface_hub's, ``HF_HUB_CACHE``).
        local_files_only: Never use the network (None: as ``HF_HUB_OFFLINE`` says).
        token: A Hub token for gated or private repos (default: huggingface_hub's).
        feature: What asks, for error messages.
        extra: The extra of this package that installs huggingface_hub there.

    Returns:
        The file's path in the cached snapshot (a symlink to its blob, beside the
        other files of the snapshot).

    Raises:
        FileNotFoundError: Nothing matches, or the file is not cached and may not (or
            could not) be downloaded; the message says what to run.
        ValueError: ``filename`` matches several files, or ``repo_id`` is not a repo id.
    """
    hub = _hub(feature, extra)
    require("huggingface_hub.utils").validate_repo_id(repo_id)
    repo_cache = _repo_cache(repo_id, cache_dir)
    about = f"{feature}: {repo_id!r} (revision {_revision(revision)})"
    snapshot, _ = _cached_snapshot(
        hub, repo_id, revision, cache_dir, token, {"allow_patterns": [filename]}
    )
    cached: list[str] = []
    if snapshot is not None:
        cached = _snapshot_files(snapshot)
        choice = _choose(cached, filename, repo_id, f"in the cached snapshot {snapshot}")
        if choice is not None:
            chosen, needed = choice
            missing = [n for n in needed if n not in cached]
            if not missing:
                return snapshot / chosen
            cached_state = f"its cached snapshot {snapshot.name[:12]} lacks {_listing(missing)}"
        else:
            cached_state = (
                f"its cached snapshot {snapshot.name[:12]} has no file matching; "
                f"{_no_match(cached, filename)}"
            )
    else:
        cached_state = _what_is_cached(repo_cache)
    why = _no_download(local_files_only)
    fetch = _fetch(repo_id, revision, cache_dir, filename)
    if why is not None:
        msg = (
            f"{about}: no file matching {filename!r} is in the Hugging Face cache at "
            f"{repo_cache} ({cached_state}), and {why}. Fetch it "
            f"where the Hub is reachable with {fetch}, then run this again."
        )
        raise FileNotFoundError(msg)
    try:
        names = sorted(hub.HfApi(token=token).list_repo_files(repo_id, revision=revision))
    except Exception as e:
        msg = (
            f"{about}: no file matching {filename!r} is in the Hugging Face cache at "
            f"{repo_cache} ({cached_state}), and listing the repo on the Hub failed: {e}. "
            f"Fetch it where the Hub is reachable with {fetch}."
        )
        raise FileNotFoundError(msg) from e
    choice = _choose(names, filename, repo_id, "on the Hub")
    if choice is None:
        msg = f"{about}: no file matches {filename!r}; {_no_match(names, filename)}"
        raise FileNotFoundError(msg)
    chosen, needed = choice
    try:
        paths = {
            n: hub.hf_hub_download(
                repo_id, filename=n, revision=revision, cache_dir=cache_dir, token=token
            )
            for n in needed
        }
    except Exception as e:
        msg = f"{about}: downloading {chosen!r} into {repo_cache} failed: {e}. Or run {fetch}."
        raise FileNotFoundError(msg) from e
    return Path(paths[chosen])


def _model_gap(snapshot: Path) -> str | None:
    """What a snapshot lacks to be a model directory, or None."""
    files = _snapshot_files(snapshot)
    if "config.json" not in files:
        return f"it has no config.json ({_listing(files)})"
    if not any(fnmatch.fnmatchcase(Path(f).name, w) for f in files for w in _WEIGHTS):
        return f"it has no weights ({_listing(files)})"
    return None


def hub_snapshot(
    repo_id: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
    force_download: bool = False,
    feature: str = "from_pretrained",
    extra: str | None = None,
) -> Path:
    """The cached snapshot directory of a model repo: ``config.json``, weights, tokenizer.

    The cached snapshot of ``revision`` is used if it holds a config and weights (and
    huggingface_hub's listing of the commit, where it keeps one, shows nothing
    missing). Otherwise the snapshot is downloaded (without GGUF, ONNX, TensorFlow,
    Flax and other formats a model directory is not loaded from; without
    ``pytorch_model*.bin`` where safetensors exist), unless ``local_files_only`` or
    ``HF_HUB_OFFLINE`` forbids it.

    Args:
        repo_id: ``org/name`` (or ``name``) on the Hub.
        revision: A branch, tag or commit hash (default ``main``).
        cache_dir: The Hub cache (default: huggingface_hub's, ``HF_HUB_CACHE``).
        local_files_only: Never use the network (None: as ``HF_HUB_OFFLINE`` says).
        token: A Hub token for gated or private repos (default: huggingface_hub's).
        force_download: Download again even if cached.
        feature: What asks, for error messages.
        extra: The extra of this package that installs huggingface_hub there.

    Returns:
        The snapshot folder (its files are symlinks to the cache's blobs).

    Raises:
        FileNotFoundError: The model is not (completely) cached and may not, or could
            not, be downloaded; the message says what to run.
        ValueError: ``repo_id`` is not a repo id.
    """
    hub = _hub(feature, extra)
    require("huggingface_hub.utils").validate_repo_id(repo_id)
    repo_cache = _repo_cache(repo_id, cache_dir)
    about = f"{feature}: model {repo_id!r} (revision {_revision(revision)})"
    ignore = {"ignore_patterns": list(_OTHER_FORMATS)}
    gap: str | None = "force_download=True"
    if not force_download:
        snapshot, gap = _cached_snapshot(hub, repo_id, revision, cache_dir, token, ignore)
        if snapshot is None:
            gap = _what_is_cached(repo_cache)
        elif gap is None:
            gap = _model_gap(snapshot)
            if gap is None:
                return snapshot
            gap = f"its cached snapshot {snapshot.name[:12]} is incomplete: {gap}"
    why = _no_download(local_files_only)
    fetch = _fetch(repo_id, revision, cache_dir, None)
    if why is not None:
        msg = (
            f"{about} is not a local directory and is not (completely) in the Hugging "
            f"Face cache at {repo_cache} ({gap}), and {why}. Fetch "
            f"it where the Hub is reachable with {fetch}, then run this again; or give "
            "the directory save_pretrained() wrote."
        )
        raise FileNotFoundError(msg)
    try:
        files = hub.HfApi(token=token).list_repo_files(repo_id, revision=revision)
        if any(f.endswith(".safetensors") for f in files):
            ignore["ignore_patterns"].append("pytorch_model*.bin")
        folder = Path(
            hub.snapshot_download(
                repo_id, revision=revision, cache_dir=cache_dir, token=token,
                force_download=force_download, **ignore,
            )
        )  # fmt: skip
    except Exception as e:
        msg = (
            f"{about} is not (completely) in the Hugging Face cache at {repo_cache} "
            f"({gap}), and downloading it failed: {e}. Fetch it where the Hub is "
            f"reachable with {fetch}."
        )
        raise FileNotFoundError(msg) from e
    gap = _model_gap(folder)
    if gap is not None:
        msg = f"{about} at {folder} is not a model directory: {gap}"
        raise FileNotFoundError(msg)
    return folder
