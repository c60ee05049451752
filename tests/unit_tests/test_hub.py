"""Resolving Hub ids in the Hugging Face cache (langchain_localllms.core.hub), no models.

Every cache here is laid out as huggingface_hub writes one (modelkit.hubcache), and the
code that reads it is huggingface_hub's own (snapshot_download, hf_hub_download). Unit
tests run with sockets disabled; the online branch is driven through fakes of the two
network calls.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import huggingface_hub.errors
import pytest

from langchain_localllms.core import hub as _hub
from langchain_localllms.core.hub import hub_file, hub_snapshot, is_repo_id, match_files
from modelkit import hubcache

REPO = "org/model-GGUF"
UNREACHABLE = _hub._unreachable


@pytest.fixture(autouse=True)
def online_by_default(monkeypatch):
    # Each test says whether it is offline; none inherits it from the environment.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    # The fakes below stand in for a Hub that answers.
    monkeypatch.setattr(_hub, "_unreachable", lambda timeout=3.0: None)


def files(tmp_path: Path, **named: str) -> dict[str, Path]:
    """Small local files with the given contents, by their path in the repo."""
    out = {}
    for i, (rel, text) in enumerate(named.items()):
        f = tmp_path / "src" / f"{i}-{Path(rel).name}"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
        out[rel] = f
    return out


def gguf_repo(tmp_path: Path, *names: str, **options) -> tuple[Path, Path]:
    cache = tmp_path / "hub"
    snap = hubcache.lay(cache, REPO, files(tmp_path, **{n: n for n in names}), **options)
    return cache, snap


# ------------------------------------------------------------------ matching
def test_match_files_is_fnmatch_over_repo_paths():
    names = ["README.md", "m-Q4_K_M.gguf", "m-Q8_0.gguf", "sub/m-Q4_K_M.gguf"]
    assert match_files(names, "*Q4_K_M.gguf") == ["m-Q4_K_M.gguf", "sub/m-Q4_K_M.gguf"]
    assert match_files(names, "sub/*.gguf") == ["sub/m-Q4_K_M.gguf"]
    assert match_files(names, "m-Q8_0.gguf") == ["m-Q8_0.gguf"]
    assert match_files(names, "*q4_k_m.gguf") == []  # case-sensitive everywhere
    assert match_files(["a[1].gguf", "a1.gguf"], "a[1].gguf") == ["a[1].gguf"]  # the name
    assert match_files(["a1.gguf"], "a[1].gguf") == ["a1.gguf"]  # else a glob


def test_repo_ids_and_paths_are_told_apart(tmp_path, monkeypatch):
    assert is_repo_id("org/name")
    assert is_repo_id("gpt2")
    assert is_repo_id("Org/n.a-me_1")
    for path in ("./x", "../x", "~/x", "/abs/x", "a/b/c", ".hidden", "a\\b", "org/--x", ""):
        assert not is_repo_id(path), path
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").mkdir()
    assert not is_repo_id("org/name")  # an existing directory is local


# ------------------------------------------------------------- files, offline
def test_a_cached_file_resolves_offline_to_its_snapshot_path(tmp_path):
    cache, snap = gguf_repo(tmp_path, "m-Q4_K_M.gguf", "m-Q8_0.gguf", "README.md")
    path = hub_file(REPO, "*Q4_K_M.gguf", cache_dir=cache, local_files_only=True)
    assert path == snap / "m-Q4_K_M.gguf"
    assert path.is_symlink()
    assert path.resolve().parent.name == "blobs"
    assert path.read_text() == "m-Q4_K_M.gguf"


def test_revision_by_branch_tag_and_commit(tmp_path):
    cache = tmp_path / "hub"
    old = hubcache.lay(cache, REPO, files(tmp_path, **{"m-Q4_K_M.gguf": "old"}), refs=["main"])
    new = hubcache.lay(
        cache, REPO, files(tmp_path / "2", **{"m-Q4_K_M.gguf": "new"}), refs=["main", "v2"]
    )
    assert old.name != new.name
    kw = {"cache_dir": cache, "local_files_only": True}
    assert hub_file(REPO, "*.gguf", **kw).read_text() == "new"  # main moved to the new one
    assert hub_file(REPO, "*.gguf", revision="v2", **kw).read_text() == "new"
    assert hub_file(REPO, "*.gguf", revision=old.name, **kw).read_text() == "old"
    with pytest.raises(FileNotFoundError) as e:
        hub_file(REPO, "*.gguf", revision="v3", **kw)
    assert "'v3'" in str(e.value)
    assert "main, v2" in str(e.value)
    assert "--revision v3" in str(e.value)


def test_several_matches_are_a_value_error_that_lists_them(tmp_path):
    cache, _ = gguf_repo(tmp_path, "a-Q4_K_M.gguf", "b-Q4_K_M.gguf", "a-Q8_0.gguf")
    with pytest.raises(ValueError, match="2 files of 'org/model-GGUF' match") as e:
        hub_file(REPO, "*Q4_K_M.gguf", cache_dir=cache, local_files_only=True)
    assert "a-Q4_K_M.gguf, b-Q4_K_M.gguf" in str(e.value)
    assert "a-Q8_0.gguf" not in str(e.value)


@pytest.mark.parametrize(
    ("why", "offline_env"), [("local_files_only=True", None), ("HF_HUB_OFFLINE=1", "1")]
)
def test_an_offline_miss_names_repo_pattern_cache_and_the_fix(
    tmp_path, monkeypatch, why, offline_env
):
    cache, _ = gguf_repo(tmp_path, "m-q4_k_m.gguf", "README.md")
    if offline_env:
        monkeypatch.setenv("HF_HUB_OFFLINE", offline_env)
    with pytest.raises(FileNotFoundError) as e:
        hub_file(REPO, "*Q4_K_M.gguf", cache_dir=cache, local_files_only=not offline_env or None)
    msg = str(e.value)
    assert "'org/model-GGUF'" in msg
    assert "'*Q4_K_M.gguf'" in msg
    assert str(cache / "models--org--model-GGUF") in msg
    assert f"{why} forbids downloading" in msg
    assert f"`hf download org/model-GGUF --include '*Q4_K_M.gguf' --cache-dir {cache}`" in msg
    assert "README.md, m-q4_k_m.gguf" in msg  # what is there
    assert "only if case is ignored: m-q4_k_m.gguf" in msg


def test_an_offline_miss_of_an_uncached_repo(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing of this repo is cached") as e:
        hub_file("someone/else", "*.gguf", cache_dir=tmp_path, local_files_only=True)
    assert isinstance(e.value, FileNotFoundError)
    assert str(tmp_path / "models--someone--else") in str(e.value)


def test_a_bad_repo_id_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="repo"):
        hub_file("a/b/c", "*.gguf", cache_dir=tmp_path, local_files_only=True)


def test_a_split_gguf_comes_whole_or_not_at_all(tmp_path):
    parts = [f"m-Q4_K_M-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]
    cache, snap = gguf_repo(tmp_path, *parts, "m-Q8_0.gguf")
    kw = {"cache_dir": cache, "local_files_only": True}
    assert hub_file(REPO, "*Q4_K_M*.gguf", **kw) == snap / parts[0]
    assert hub_file(REPO, "*Q4_K_M-00001-of-*.gguf", **kw) == snap / parts[0]
    (snap / parts[2]).unlink()
    with pytest.raises(FileNotFoundError, match=f"lacks {parts[2]}"):
        hub_file(REPO, "*Q4_K_M*.gguf", **kw)


def test_one_file_of_a_repo_with_many_resolves_offline(tmp_path):
    # What `hf download repo --include '*Q4_K_M.gguf'` leaves: huggingface_hub (>= 2)
    # keeps the listing of the whole commit, in which the other quantizations are missing.
    cache, snap = gguf_repo(tmp_path, "m-Q4_K_M.gguf", listed={"m-Q8_0.gguf": 10, "m-F16.gguf": 20})
    path = hub_file(REPO, "*Q4_K_M.gguf", cache_dir=cache, local_files_only=True)
    assert path == snap / "m-Q4_K_M.gguf"
    with pytest.raises(FileNotFoundError, match="forbids downloading"):
        hub_file(REPO, "*Q8_0.gguf", cache_dir=cache, local_files_only=True)


def test_hf_hub_cache_is_honoured(tmp_path):
    cache, snap = gguf_repo(tmp_path, "m-Q4_K_M.gguf")
    code = (
        "from langchain_localllms.core.hub import hub_file; "
        f"print(hub_file({REPO!r}, '*Q4_K_M.gguf'))"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == str(snap / "m-Q4_K_M.gguf")
    env = {**env, "HF_HUB_CACHE": str(tmp_path / "elsewhere")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0
    assert str(tmp_path / "elsewhere") in out.stderr


# -------------------------------------------------------------- files, online
class FakeHub:
    """The two network calls of huggingface_hub, answered from a local 'remote'."""

    def __init__(self, monkeypatch, tmp_path, remote: dict[str, str]):
        self.remote = files(tmp_path / "remote", **remote)
        self.listed = 0
        self.downloaded: list[str] = []
        fake = self

        class Api:
            def __init__(self, token=None):
                pass

            def list_repo_files(self, repo_id, revision=None):
                fake.listed += 1
                return list(fake.remote)

        def download(repo_id, filename, revision=None, cache_dir=None, token=None):
            fake.downloaded.append(filename)
            snap = hubcache.lay(
                cache_dir, repo_id, {filename: fake.remote[filename]}, commit="c" * 40
            )
            return str(snap / filename)

        monkeypatch.setattr(huggingface_hub, "HfApi", Api)
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)


def test_a_miss_online_is_listed_matched_and_downloaded_once(tmp_path, monkeypatch):
    fake = FakeHub(monkeypatch, tmp_path, {"m-Q4_K_M.gguf": "q4", "m-Q8_0.gguf": "q8"})
    cache = tmp_path / "hub"
    path = hub_file(REPO, "*Q4_K_M.gguf", cache_dir=cache)
    assert path.read_text() == "q4"
    assert fake.downloaded == ["m-Q4_K_M.gguf"]
    assert hub_file(REPO, "*Q4_K_M.gguf", cache_dir=cache) == path  # now from the cache
    assert fake.listed == 1
    assert fake.downloaded == ["m-Q4_K_M.gguf"]
    with pytest.raises(FileNotFoundError, match=re.escape("it has m-Q4_K_M.gguf, m-Q8_0.gguf")):
        hub_file(REPO, "*F16.gguf", cache_dir=cache)
    with pytest.raises(ValueError, match=r"2 files .*\(on the Hub\)"):
        hub_file(REPO, "*.gguf", revision="other", cache_dir=cache)
    assert fake.downloaded == ["m-Q4_K_M.gguf"]  # neither downloaded anything


def test_a_failing_hub_is_a_file_not_found_error_with_the_fix(tmp_path, monkeypatch):
    class Api:
        def __init__(self, token=None):
            pass

        def list_repo_files(self, repo_id, revision=None):
            raise ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    with pytest.raises(FileNotFoundError, match=r"no route to host.*hf download") as e:
        hub_file(REPO, "*.gguf", cache_dir=tmp_path)
    assert isinstance(e.value.__cause__, ConnectionError)


def test_an_unreachable_hub_fails_at_once_without_retries(tmp_path, monkeypatch):
    dialled = []

    def refuse(address, timeout=None):
        dialled.append((address, timeout))
        raise OSError("network unreachable")

    class Api:
        def __init__(self, token=None):
            raise AssertionError("the Hub was asked")

    monkeypatch.setattr(_hub, "_unreachable", UNREACHABLE)
    monkeypatch.setattr(_hub.socket, "create_connection", refuse)
    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    for var in _hub._PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example:8443")
    with pytest.raises(FileNotFoundError, match="cannot be downloaded now") as e:
        hub_file(REPO, "*.gguf", cache_dir=tmp_path)
    assert "https://hub.example:8443 is not reachable (network unreachable)" in str(e.value)
    with pytest.raises(FileNotFoundError, match="cannot be downloaded now"):
        hub_snapshot("org/tiny", cache_dir=tmp_path)
    assert dialled == [(("hub.example", 8443), 3.0)] * 2
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")  # no direct dial behind a proxy
    assert UNREACHABLE() is None


# ---------------------------------------------------------- model directories
def model_repo(tmp_path: Path, repo: str = "org/tiny", **named: str) -> tuple[Path, Path]:
    named = named or {"config.json": "{}", "model.safetensors": "w", "tokenizer.json": "{}"}
    cache = tmp_path / "hub"
    return cache, hubcache.lay(cache, repo, files(tmp_path, **named))


def test_a_cached_model_directory_resolves_offline(tmp_path):
    cache, snap = model_repo(tmp_path)
    assert hub_snapshot("org/tiny", cache_dir=cache, local_files_only=True) == snap


@pytest.mark.parametrize(
    ("named", "gap"),
    [
        ({"model-Q4_K_M.gguf": "x"}, "no config.json"),
        ({"config.json": "{}", "tokenizer.json": "{}"}, "no weights"),
    ],
)
def test_an_incomplete_model_directory_is_a_miss(tmp_path, named, gap):
    cache, _ = model_repo(tmp_path, **named)
    with pytest.raises(FileNotFoundError, match=gap) as e:
        hub_snapshot("org/tiny", cache_dir=cache, local_files_only=True)
    assert "is not a local directory" in str(e.value)
    assert "`hf download org/tiny --cache-dir" in str(e.value)


def test_a_snapshot_its_listing_shows_incomplete_is_a_miss(tmp_path):
    # huggingface_hub >= 2 (the unit suite's .venv has 2.4) keeps a commit's listing.
    cache = tmp_path / "hub"
    hubcache.lay(
        cache, "org/tiny", files(tmp_path, **{"config.json": "{}", "model.safetensors": "w"}),
        listed={"tokenizer.json": 5, "model.onnx": 9},
    )  # fmt: skip
    with pytest.raises(FileNotFoundError, match=re.escape("tokenizer.json")) as e:
        hub_snapshot("org/tiny", cache_dir=cache, local_files_only=True)
    assert "model.onnx" not in str(e.value)  # not needed: not asked for


def test_a_model_miss_online_downloads_the_snapshot_without_other_formats(tmp_path, monkeypatch):
    calls = []
    real = huggingface_hub.snapshot_download
    remote = files(tmp_path / "remote", **{"config.json": "{}", "model.safetensors": "w"})

    def snapshot_download(repo_id, **kw):
        if kw.get("local_files_only"):
            return real(repo_id, **kw)
        calls.append(kw)
        return str(hubcache.lay(kw["cache_dir"], repo_id, remote))

    class Api:
        def __init__(self, token=None):
            pass

        def list_repo_files(self, repo_id, revision=None):
            return [*remote, "pytorch_model.bin", "model.onnx"]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    cache = tmp_path / "hub"
    snap = hub_snapshot("org/tiny", cache_dir=cache)
    assert (snap / "model.safetensors").read_text() == "w"
    assert len(calls) == 1
    assert {"*.gguf", "*.onnx", "pytorch_model*.bin"} <= set(calls[0]["ignore_patterns"])
    assert hub_snapshot("org/tiny", cache_dir=cache) == snap
    assert len(calls) == 1


# ------------------------------------------------------------ the classes' API
def test_the_classes_fail_fast_offline_before_loading_a_runtime(tmp_path, monkeypatch):
    from langchain_localllms import CTranslate2, HuggingFacePipeline, LlamaCpp

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"LlamaCpp.from_pretrained: 'org/x'.*\*Q4_K_M"):
        LlamaCpp.from_pretrained("org/x", cache_dir=tmp_path)
    with pytest.raises(TypeError, match="model_path"):
        LlamaCpp.from_pretrained("org/x", model_path="y.gguf")
    ct2_miss = re.escape("CTranslate2.from_pretrained: model 'org/x'")
    with pytest.raises(FileNotFoundError, match=ct2_miss):
        CTranslate2.from_pretrained("org/x", hub_cache_dir=tmp_path)
    with pytest.raises(ValueError, match="revision and hub_cache_dir apply to a Hub id"):
        CTranslate2.from_pretrained(str(tmp_path), revision="main")
    with pytest.raises(FileNotFoundError, match="HuggingFacePipeline: model 'org/x'"):
        HuggingFacePipeline.from_model_id(
            "org/x", task="text-generation", model_kwargs={"cache_dir": str(tmp_path)}
        )


def test_module_stays_light():
    # Importing the resolution code imports no runtime and no huggingface_hub.
    code = "import sys, langchain_localllms.core.hub; print('huggingface_hub' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert _hub.__all__ == ["hub_file", "hub_snapshot", "is_repo_id", "match_files"]
