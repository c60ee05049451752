"""Drop-in: code written for langchain_community.llms runs with our classes.

The parameters and defaults below are langchain_community 0.4.2's own (each class's
fields beyond BaseLLM's). Passing every one of them, with community's defaults, must
construct our class, answer, and warn about nothing; docs/dropin.md lists each
choice made where a value cannot work here.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest

import langchain_localllms as ours
from tests.integration_tests import servers

COMMUNITY: dict[str, dict[str, Any]] = {
    "LlamaCpp": {
        "client": None, "echo": False, "f16_kv": True, "grammar": None, "grammar_path": None,
        "last_n_tokens_size": 64, "logits_all": False, "logprobs": None, "lora_base": None,
        "lora_path": None, "max_tokens": 256, "model_kwargs": {}, "n_batch": 8, "n_ctx": 512,
        "n_gpu_layers": None, "n_parts": -1, "n_threads": None, "repeat_penalty": 1.1,
        "rope_freq_base": 10000.0, "rope_freq_scale": 1.0, "seed": -1, "stop": [],
        "streaming": True, "suffix": None, "temperature": 0.8, "top_k": 40, "top_p": 0.95,
        "use_mlock": False, "use_mmap": True, "vocab_only": False,
    },
    "GPT4All": {
        "allow_download": False, "backend": None, "client": None, "device": "cpu",
        "echo": False, "embedding": False, "f16_kv": False, "logits_all": False,
        "max_tokens": 200, "n_batch": 8, "n_parts": -1, "n_threads": 4, "repeat_last_n": 64,
        "repeat_penalty": 1.18, "seed": 0, "stop": [], "streaming": False, "temp": 0.7,
        "top_k": 40, "top_p": 0.1, "use_mlock": False, "vocab_only": False,
    },
    "CTranslate2": {
        "client": None, "compute_type": "default", "ctranslate2_kwargs": {}, "device": "cpu",
        "device_index": 0, "max_length": 512, "sampling_temperature": 1, "sampling_topk": 1,
        "sampling_topp": 1, "tokenizer": None,
    },
    "Llamafile": {
        "frequency_penalty": 0.0, "min_p": 0.05, "mirostat": 0, "mirostat_eta": 0.1,
        "mirostat_tau": 5.0, "n_keep": 0, "n_predict": -1, "penalize_nl": True,
        "presence_penalty": 0.0, "repeat_last_n": 64, "repeat_penalty": 1.1,
        "request_timeout": None, "seed": -1, "streaming": False, "temperature": 0.8,
        "tfs_z": 1.0, "top_k": 40, "top_p": 0.95, "typical_p": 1.0,
    },
    "Ollama": {
        "auth": None, "format": None, "headers": None, "keep_alive": None, "mirostat": None,
        "mirostat_eta": None, "mirostat_tau": None, "num_ctx": None, "num_gpu": None,
        "num_predict": None, "num_thread": None, "raw": None, "repeat_last_n": None,
        "repeat_penalty": None, "stop": None, "system": None, "temperature": None,
        "template": None, "tfs_z": None, "timeout": None, "top_k": None, "top_p": None,
    },
}  # fmt: skip


def where(name: str, model_path, urls: dict[str, str]) -> dict[str, Any]:
    """The model (or server) a class needs, as community code would name it."""
    if name == "LlamaCpp":
        return {"model_path": str(model_path("tiny-gguf"))}
    if name == "GPT4All":
        return {"model": str(model_path("tiny-gguf")), "n_ctx": 512}
    if name == "CTranslate2":
        path = str(model_path("tiny-ct2"))
        return {"model_path": path, "tokenizer_name": path}
    if name == "Llamafile":
        return {"base_url": urls["llamafile"]}
    return {"base_url": urls["ollama"], "model": servers.GEMMA}


@pytest.mark.parametrize("name", list(COMMUNITY))
def test_every_community_parameter_at_its_default_is_taken_silently(name, model_path):
    urls = {}
    if name == "Llamafile":
        urls["llamafile"] = servers.llama_server().url
    if name == "Ollama":
        urls["ollama"] = servers.ollama_server().url
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        llm = getattr(ours, name)(**COMMUNITY[name], **where(name, model_path, urls))
    assert isinstance(llm.invoke("The first man on the moon was", stop=None), str)
