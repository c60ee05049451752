"""Loading by Hub id from a real Hugging Face cache, with no network at all.

The kit's models are laid out as huggingface_hub caches a download
(``models--org--name/blobs``, ``snapshots/<commit>`` symlinks, ``refs``; see
modelkit.hubcache), so what resolves them is huggingface_hub's own code. Every test
runs with ``HF_HUB_OFFLINE=1`` and Python sockets disabled: a network attempt fails it.
"""

from __future__ import annotations

import re
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import pytest
import pytest_socket

from langchain_localllms import CTranslate2, HuggingFacePipeline, LlamaCpp
from modelkit import hubcache

GGUF_REPO = "kit/gemma-3-270m-GGUF"
TINY_GGUF_REPO = "kit/tiny-llama-GGUF"
TINY_REPO = "kit/tiny-llama"
GEMMA_REPO = "kit/gemma-3-270m"
GREEDY = {"temperature": 0.0, "repeat_penalty": 1.0, "max_tokens": 8, "n_threads": 2, "n_ctx": 256}
PROMPT = "The first man on the moon was"


@pytest.fixture(scope="session")
def hub(tmp_path_factory):
    """One Hub cache for the session: the kit's models under made-up repo ids."""
    cache = tmp_path_factory.mktemp("hf-hub")
    gguf = hubcache.artifact_files("gemma-gguf")
    readme = tmp_path_factory.mktemp("readme")
    (readme / "v1").write_text("v1")
    (readme / "v2").write_text("v2")
    old = hubcache.lay(cache, GGUF_REPO, {**gguf, "README.md": readme / "v1"}, refs=["v1"])
    # main: what `hf download kit/gemma-3-270m-GGUF --include '*Q4_K_M.gguf'` leaves of
    # a repo with several quantizations (huggingface_hub >= 2 lists the others).
    new = hubcache.lay(
        cache, GGUF_REPO, {**gguf, "README.md": readme / "v2"}, refs=["main"],
        listed={"gemma-3-270m-Q8_0.gguf": 291_000_000, "gemma-3-270m-F16.gguf": 543_000_000},
    )  # fmt: skip
    tiny = hubcache.artifact_files("tiny-gguf") | hubcache.artifact_files("tiny-chat-gguf")
    hubcache.lay(cache, TINY_GGUF_REPO, tiny)
    hubcache.lay_artifact(cache, "tiny-hf", TINY_REPO)
    hubcache.lay_artifact(cache, "gemma-hf", GEMMA_REPO)
    return {"cache": cache, "old": old.name, "new": new.name}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pytest_socket.disable_socket(allow_unix_socket=True)
    yield
    pytest_socket.enable_socket()


@pytest.mark.filterwarnings("ignore:A test tried to use socket")
def test_the_network_is_off():
    import socket

    with pytest.raises(pytest_socket.SocketBlockedError):
        socket.create_connection(("huggingface.co", 443), timeout=1)


def snapshot_of(path: str | Path) -> str:
    """The commit of the snapshot a cached file or directory is in."""
    p = Path(path)
    while p.parent.name != "snapshots":
        p = p.parent
    return p.name


# ------------------------------------------------------------------ LlamaCpp
def test_llamacpp_from_pretrained_loads_the_cached_gguf_and_generates(hub):
    llm = LlamaCpp.from_pretrained(GGUF_REPO, cache_dir=hub["cache"], **GREEDY)
    path = Path(llm.model_path)
    assert path.name == "gemma-3-270m-Q4_K_M.gguf"
    assert snapshot_of(path) == hub["new"]  # main
    assert path.is_symlink()
    assert path.resolve().parent.name == "blobs"
    assert llm.invoke(PROMPT).startswith(" a man named Apollo")
    assert llm.model_info().architecture == "gemma3"


def test_chat_llamacpp_from_pretrained_takes_the_same_arguments(hub):
    from langchain_core.callbacks import BaseCallbackHandler

    from langchain_localllms import ChatLlamaCpp

    handler = BaseCallbackHandler()
    chat = ChatLlamaCpp.from_pretrained(
        GGUF_REPO, cache_dir=hub["cache"], callbacks=[handler], **GREEDY
    )
    assert Path(chat.llm.model_path).name == "gemma-3-270m-Q4_K_M.gguf"
    assert chat.callbacks == [handler]  # the chat model's own setting stays with it
    assert chat.temperature == 0.0  # the runtime's went to its LLM
    assert chat.invoke(PROMPT).content
    chat.close()


def test_llamacpp_from_pretrained_reads_huggingface_hubs_default_cache(hub, monkeypatch):
    # No cache_dir: huggingface_hub's own default (HF_HUB_CACHE, read at its import).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub["cache"]))
    llm = LlamaCpp.from_pretrained(GGUF_REPO, "gemma-3-270m-Q4_K_M.gguf", **GREEDY)
    assert (
        Path(llm.model_path).parent.parent.parent == hub["cache"] / "models--kit--gemma-3-270m-GGUF"
    )


def test_llamacpp_revision_by_branch_and_by_commit(hub):
    kw = {"cache_dir": hub["cache"], "local_files_only": True, **GREEDY}
    by_branch = LlamaCpp.from_pretrained(GGUF_REPO, revision="v1", **kw)
    by_commit = LlamaCpp.from_pretrained(GGUF_REPO, revision=hub["old"], **kw)
    for llm in (by_branch, by_commit):
        assert snapshot_of(llm.model_path) == hub["old"]
        assert (Path(llm.model_path).parent / "README.md").read_text() == "v1"
    main = LlamaCpp.from_pretrained(GGUF_REPO, revision="main", **kw)
    assert (Path(main.model_path).parent / "README.md").read_text() == "v2"
    # The same bytes: the cache key of LangChain's cache is the blob, whatever the commit.
    assert main._identifying_params["model_path"] == by_commit._identifying_params["model_path"]


def test_llamacpp_exact_names_and_glob_errors(hub):
    kw = {"cache_dir": hub["cache"], "f16_kv": False, **GREEDY}
    tiny = LlamaCpp.from_pretrained(TINY_GGUF_REPO, "tiny-llama-f32.gguf", **kw)
    assert Path(tiny.model_path).name == "tiny-llama-f32.gguf"
    assert tiny.invoke("The moon")  # it runs
    with pytest.raises(
        ValueError, match=re.escape("2 files of 'kit/tiny-llama-GGUF' match '*.gguf'")
    ) as e:
        LlamaCpp.from_pretrained(TINY_GGUF_REPO, "*.gguf", **kw)
    assert "tiny-chat-f32.gguf, tiny-llama-f32.gguf" in str(e.value)
    with pytest.raises(FileNotFoundError) as e:
        LlamaCpp.from_pretrained(TINY_GGUF_REPO, **kw)  # default: *Q4_K_M.gguf
    assert "has no file matching" in str(e.value)
    assert "tiny-chat-f32.gguf, tiny-llama-f32.gguf" in str(e.value)


def test_llamacpp_offline_miss_names_repo_file_cache_and_fix(hub):
    repo_cache = hub["cache"] / "models--kit--gemma-3-270m-GGUF"
    with pytest.raises(FileNotFoundError) as e:
        LlamaCpp.from_pretrained(GGUF_REPO, "*Q8_0.gguf", cache_dir=hub["cache"])
    msg = str(e.value)
    assert "'kit/gemma-3-270m-GGUF'" in msg
    assert "'*Q8_0.gguf'" in msg
    assert str(repo_cache) in msg
    assert "HF_HUB_OFFLINE=1 forbids downloading" in msg
    assert f"hf download {GGUF_REPO} --include '*Q8_0.gguf'" in msg
    with pytest.raises(FileNotFoundError, match="nothing of this repo is cached") as e:
        LlamaCpp.from_pretrained("kit/absent-GGUF", cache_dir=hub["cache"])
    assert str(hub["cache"] / "models--kit--absent-GGUF") in str(e.value)


# ------------------------------------------------------- HuggingFacePipeline
def hf_greedy(model_id: str, **kwargs) -> HuggingFacePipeline:
    return HuggingFacePipeline.from_model_id(
        model_id=model_id, task="text-generation",
        pipeline_kwargs={"max_new_tokens": 8, "do_sample": False}, **kwargs,
    )  # fmt: skip


def test_huggingface_pipeline_from_model_id_by_hub_id(hub, model_path):
    by_id = hf_greedy(TINY_REPO, model_kwargs={"cache_dir": str(hub["cache"])})
    assert by_id.model_id == TINY_REPO  # what LangSmith names
    loaded = by_id._identifying_params["model_id"]  # what loads, and the cache key
    assert Path(loaded).parent.name == "snapshots"
    assert by_id.model.config.model_type == "llama"
    local = hf_greedy(str(model_path("tiny-hf")))  # a directory: as before
    assert by_id.invoke(PROMPT) == local.invoke(PROMPT)
    pinned = hf_greedy(
        TINY_REPO,
        model_kwargs={
            "cache_dir": str(hub["cache"]), "revision": snapshot_of(loaded),
            "local_files_only": True,
        },
    )  # fmt: skip
    assert pinned._identifying_params["model_id"] == loaded


def test_huggingface_pipeline_gemma_by_hub_id(hub):
    hf = hf_greedy(GEMMA_REPO, model_kwargs={"cache_dir": str(hub["cache"])})
    assert hf.invoke(PROMPT).startswith(" a man named Apollo")


def test_huggingface_pipeline_offline_miss(hub):
    with pytest.raises(FileNotFoundError) as e:
        hf_greedy(TINY_REPO, model_kwargs={"cache_dir": str(hub["cache"]), "revision": "v9"})
    msg = str(e.value)
    assert "model 'kit/tiny-llama' (revision 'v9') is not a local directory" in msg
    assert str(hub["cache"] / "models--kit--tiny-llama") in msg
    assert "hf download kit/tiny-llama --revision v9" in msg
    with pytest.raises(FileNotFoundError, match=re.escape("no config.json")):
        hf_greedy(GGUF_REPO, model_kwargs={"cache_dir": str(hub["cache"])})


# ---------------------------------------------------------------- CTranslate2
@pytest.fixture
def conversions(monkeypatch):
    """The output directories of every CTranslate2 conversion that runs."""
    from ctranslate2.converters import TransformersConverter

    done: list[str] = []
    real = TransformersConverter.convert

    def counting(self, output_dir, *args, **kwargs):
        done.append(output_dir)
        return real(self, output_dir, *args, **kwargs)

    monkeypatch.setattr(TransformersConverter, "convert", counting)
    return done


def test_ctranslate2_from_pretrained_by_hub_id_converts_once(
    hub, model_path, tmp_path, conversions
):
    converted = tmp_path / "ct2"
    kw = {"hub_cache_dir": hub["cache"], "cache_dir": converted, "max_length": 8}
    first = CTranslate2.from_pretrained(TINY_REPO, **kw)
    second = CTranslate2.from_pretrained(TINY_REPO, local_files_only=True, **kw)
    assert len(conversions) == 1
    assert first.model_path == second.model_path
    out = Path(first.model_path)
    assert out.parent == converted
    # Named after the repo and commit, not a bare commit hash.
    assert re.fullmatch(r"kit--tiny-llama-[0-9a-f]{12}-default-[0-9a-f]{16}", out.name)
    # The tokenizer files were copied from the snapshot's symlinks as real files.
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        assert (out / name).is_file()
        assert not (out / name).is_symlink()
    src = model_path("tiny-hf")
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    kit = CTranslate2(model_path=str(model_path("tiny-ct2")), max_length=8)
    assert first.invoke(PROMPT) == kit.invoke(PROMPT)


def test_ctranslate2_conversion_follows_the_commit(hub, tmp_path, conversions):
    # A new commit on main (a file more): converted anew, under its own name.
    cache = tmp_path / "hub"
    files = hubcache.artifact_files("tiny-hf")
    first_snap = hubcache.lay(cache, TINY_REPO, files)
    kw = {"hub_cache_dir": cache, "cache_dir": tmp_path / "ct2", "max_length": 4}
    first = CTranslate2.from_pretrained(TINY_REPO, **kw)
    readme = tmp_path / "README.md"
    readme.write_text("a model card")
    second_snap = hubcache.lay(cache, TINY_REPO, {**files, "README.md": readme})
    assert first_snap != second_snap
    second = CTranslate2.from_pretrained(TINY_REPO, **kw)
    assert len(conversions) == 2
    assert first.model_path != second.model_path
    assert second_snap.name[:12] in second.model_path
    old = CTranslate2.from_pretrained(TINY_REPO, revision=first_snap.name, **kw)
    assert old.model_path == first.model_path  # the old commit's conversion, reused
    assert len(conversions) == 2


def test_ctranslate2_offline_miss(hub, tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        CTranslate2.from_pretrained("kit/absent", hub_cache_dir=hub["cache"], cache_dir=tmp_path)
    assert "CTranslate2.from_pretrained: model 'kit/absent'" in str(e.value)
    assert str(hub["cache"] / "models--kit--absent") in str(e.value)
    assert "hf download kit/absent" in str(e.value)
