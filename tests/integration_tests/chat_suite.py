"""What the standard chat-model suites of every chat class share here.

LangChain's ``ChatModelIntegrationTests`` builds a new chat model for every test. For
runtimes that load their weights into memory (CTranslate2, Hugging Face) that is a
load per test; :class:`OneLoad` builds the LLM once per parameter set and gives each
test a new chat model over it (``Chat(llm=...)``), as a user who holds one model
would. Chat-level parameters a test adds (``output_version``) still go to the chat
model it gets.
"""

from __future__ import annotations

import json
from typing import Any

import pytest


def in_process(temperature: str = "temperature", max_tokens: str = "max_tokens") -> dict[str, Any]:
    """Standard init parameters of an in-process chat class, in its own names.

    An in-process runtime has no request timeout and nothing to retry.
    """
    return {temperature: 0, max_tokens: 100, "stop": []}


#: Why a standard test fails on Gemma-3-270M (base), measured on every runtime. Which
#: value the model writes is its own judgement (greedy, and float rounding differs
#: between CPUs), so these are xfails that may pass: what the runtime guarantees (a
#: call or JSON that validates) is tested beside each class, every time.
CALL_VALUE = "270M base model: the forced call validates; its argument (3) is written as 3e15"
NO_CALL = "270M base model does not choose to call a tool unforced"
LONG_TEXT = "270M base model: the free-text argument runs past max_tokens"
#: A cut answer is refused (OutputParserException), never returned as a shorter object.
CUT_JSON = "270M base model: a string of the JSON runs past max_tokens; the cut JSON is refused"

#: The judgement tests of a real-model suite, by name.
JUDGEMENT = {
    "test_tool_calling": CALL_VALUE,
    "test_tool_calling_async": CALL_VALUE,
    "test_agent_loop": NO_CALL,
    "test_unicode_tool_call_integration": LONG_TEXT,
}


class Expected:
    """Mixin: standard tests expected to fail here, and why (the conftest marks them).

    ``XFAIL_STRICT``: an unexpected pass is an error, where the cause cannot change
    (random weights); model judgement on a real model is not strict.
    """

    XFAIL: dict[str, str] = {}
    XFAIL_STRICT = False


_LLMS: dict[tuple[type, str], Any] = {}


class OneLoad:
    """Mixin for a standard suite class: one LLM per parameter set, per process."""

    chat_model_class: Any
    standard_chat_model_params: dict[str, Any]
    chat_model_params: dict[str, Any]

    @pytest.fixture
    def model(self, request: Any) -> Any:
        cls = self.chat_model_class
        params = {**self.standard_chat_model_params, **self.chat_model_params}
        params.update(getattr(request, "param", None) or {})
        own = {k: params.pop(k) for k in list(params) if k in cls._own_fields()}
        key = (cls, json.dumps(params, sort_keys=True, default=str))
        llm = _LLMS.get(key)
        if llm is None or llm.closed:
            llm = _LLMS[key] = cls._llm_class(**params)
        return cls(llm=llm, **own)
