"""Lay kit models out as a Hugging Face Hub cache, as ``hf download`` leaves one.

No Hub is reachable here, so tests and docs that load "from the Hub" need a cache
that huggingface_hub's own code can read, in its real layout::

    <cache>/models--org--name/
        blobs/<sha256>                      the file's bytes (a hard link to the kit's
                                            file where the filesystem allows; else a copy)
        snapshots/<commit>/<path>           -> ../../blobs/<sha256> (relative symlink)
        refs/<branch or tag>                the commit it points to
        trees/<commit>.json                 huggingface_hub >= 2's listing of the commit

``listed`` adds files to a commit's listing that are not downloaded, as when one file
of a repo with many (one quantization of several) was fetched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

import modelkit


def _kit_sums(src: Path) -> dict[str, str]:
    """sha256 of a kit artifact's files, from its manifest (no need to read GBs)."""
    manifest = src.parent / modelkit.MANIFEST
    if not manifest.is_file():
        return {}
    files = json.loads(manifest.read_text())["files"]
    return {str(src.parent / rel): digest for rel, (_size, digest) in files.items()}


def artifact_files(name: str) -> dict[str, Path]:
    """The files of a kit artifact, by their name in a repo (the manifest left out)."""
    d = modelkit.MODELS / name
    if not modelkit.is_ready(name):
        modelkit.prepare(name)
    return {f.name: f for f in sorted(d.iterdir()) if f.is_file() and f.name != modelkit.MANIFEST}


def lay(
    cache_dir: str | os.PathLike[str],
    repo_id: str,
    files: Mapping[str, Path],
    *,
    refs: Iterable[str] = ("main",),
    commit: str | None = None,
    listed: Mapping[str, int] | None = None,
) -> Path:
    """Put ``files`` (repo path -> local file) into the cache as one commit of ``repo_id``.

    Args:
        cache_dir: The Hub cache folder (what ``HF_HUB_CACHE`` names).
        repo_id: ``org/name``.
        files: Each file's path in the repo -> the local file with its bytes.
        refs: Branches or tags that point at this commit (later calls may move them).
        commit: The commit hash (default: one derived from the files).
        listed: More repo paths -> sizes, in the commit's listing only (not downloaded).

    Returns:
        The snapshot folder.
    """
    repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    sums: dict[str, str] = {}
    for src in files.values():
        sums.update(_kit_sums(Path(src)))
    digests = {rel: sums.get(str(src)) or modelkit._sha256(Path(src)) for rel, src in files.items()}
    if commit is None:
        commit = hashlib.sha1(json.dumps(sorted(digests.items())).encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    for rel, src in files.items():
        blob = repo / "blobs" / digests[rel]
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            try:
                os.link(src, blob)
            except OSError:
                shutil.copyfile(src, blob)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    tree = {
        rel: {"size": Path(src).stat().st_size, "blob_id": digests[rel][:40]}
        for rel, src in files.items()
    }
    for rel, size in (listed or {}).items():
        tree[rel] = {"size": size, "blob_id": hashlib.sha256(rel.encode()).hexdigest()[:40]}
    (repo / "trees").mkdir(exist_ok=True)
    (repo / "trees" / f"{commit}.json").write_text(
        json.dumps({"format_version": 1, "files": tree}, indent=1)
    )
    return snapshot


def lay_artifact(
    cache_dir: str | os.PathLike[str],
    name: str,
    repo_id: str,
    *,
    rename: Mapping[str, str] | None = None,
    **options: object,
) -> Path:
    """Lay a kit artifact (``gemma-gguf``, ``tiny-hf``, ...) out as a commit of ``repo_id``.

    ``rename`` maps the kit's file names to the names they have in the repo.
    """
    files = {(rename or {}).get(n, n): f for n, f in artifact_files(name).items()}
    return lay(cache_dir, repo_id, files, **options)  # type: ignore[arg-type]
