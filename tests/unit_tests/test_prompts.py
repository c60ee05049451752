"""Chat templates in a sandbox, model-aware predicates and selection (no models)."""

import time

import pytest
from langchain_core.prompts import PromptTemplate

from langchain_localllms import prompts
from langchain_localllms.prompts import (
    FORMATS,
    ChatTemplateError,
    ModelInfo,
    ModelPromptSelector,
    chat_prompt,
    has_chat_template,
    is_family,
    is_runtime,
    render_chat,
)

CHATML = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class Fake:
    def __init__(self, runtime="llamacpp", **info):
        self._llm_type = runtime
        self._info = ModelInfo(runtime=runtime, model="m", **info)

    def model_info(self):
        return self._info


def test_render_chat_template():
    out = render_chat(CHATML, [{"role": "user", "content": "hi"}], bos_token="<s>")
    assert out == "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__init__.__globals__ }}",
        "{{ raise_exception.__globals__['__builtins__'] }}",
        "{% set x = messages.append({'role': 'x'}) %}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    ],
)
def test_hostile_templates_fail_safely(template):
    with pytest.raises(ChatTemplateError):
        render_chat(template, [{"role": "user", "content": "hi"}])


def test_broken_template_names_the_problem():
    with pytest.raises(ChatTemplateError, match="broken"):
        render_chat("{% for m in messages %}", [])
    with pytest.raises(ChatTemplateError, match="System role not supported"):
        render_chat("{{ raise_exception('System role not supported') }}", [])


def test_chat_prompt_keeps_variables_and_escapes_braces():
    llm = Fake(chat_template=CHATML, bos_token="<s>", adds_bos=True)
    prompt = chat_prompt(llm, 'Answer in JSON like {{"a": 1}}: {question}', system="Be {tone}.")
    assert sorted(prompt.input_variables) == ["question", "tone"]
    text = prompt.format(question="2+2?", tone="brief")
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        '<|im_start|>user\nAnswer in JSON like {"a": 1}: 2+2?'
        "<|im_end|>\n<|im_start|>assistant\n"
    )  # and no "<s>": the runtime adds BOS itself


def test_system_is_folded_into_the_user_turn_when_refused():
    template = (
        "{% if messages[0]['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    )
    prompt = chat_prompt(Fake(chat_template=template), "{question}", system="Sys")
    assert prompt.format(question="Q") == "[Sys\n\nQ]"


def test_family_formats_when_the_model_has_no_template():
    gemma = Fake(architecture="gemma3")
    assert chat_prompt(gemma, "{q}").format(q="hi") == (
        "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
    )
    llama2 = chat_prompt(Fake(architecture="llama"), "{q}", system="S", template=FORMATS["llama-2"])
    assert llama2.format(q="hi") == "[INST] <<SYS>>\nS\n<</SYS>>\n\nhi [/INST]"
    with pytest.raises(ValueError, match="no chat template"):
        chat_prompt(Fake(architecture="mystery"), "{q}")


def test_predicates():
    llm = Fake(architecture="gemma3", chat_template=None)
    assert is_runtime("llamacpp", "ollama")(llm)
    assert not is_runtime("ctranslate2")(llm)
    assert is_family("gemma")(llm)
    assert not is_family("llama")(llm)
    assert not has_chat_template(llm)
    assert has_chat_template(Fake(chat_template=CHATML))
    assert not is_family("gemma")(object())
    assert not has_chat_template(object())


def test_selector_order():
    default = PromptTemplate.from_template("Q: {question}")
    special = PromptTemplate.from_template("[INST] {question} [/INST]")
    sel = ModelPromptSelector(default, conditionals=[(is_family("llama"), special)])
    assert sel.get_prompt(Fake(architecture="llama", chat_template=CHATML)) is special
    chatty = sel.get_prompt(Fake(architecture="qwen9", chat_template=CHATML))
    assert chatty.format(question="x").startswith("<|im_start|>user\nQ: x")
    assert sel.get_prompt(Fake(architecture="mystery")) is default
    assert (
        ModelPromptSelector(default, use_chat_format=False).get_prompt(Fake(chat_template=CHATML))
        is default
    )


@pytest.mark.parametrize(
    ("template", "why"),
    [
        # nested loops that write nothing: bounded in time
        (
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            "longer than",
        ),
        # a loop that writes a lot: bounded in size
        (
            "{% for i in range(100000) %}{% for j in range(100) %}xxxxxxxxxx{% endfor %}"
            "{% endfor %}",
            "more than",
        ),
        # one huge value: refused before it is made
        ("{{ 'x' * 1000000000 }}", "repeats a value"),
        ("{{ 7 ** 100000000 }}", "power"),
    ],
)
def test_a_hostile_template_is_bounded_in_time_and_size(template, why):
    t0 = time.monotonic()
    with pytest.raises(ChatTemplateError, match=why):
        render_chat(template, [{"role": "user", "content": "hi"}])
    assert time.monotonic() - t0 < prompts.RENDER_SECONDS * 5
    # the bound is per render: a good template still renders afterwards
    assert render_chat("{{ messages[0].content }}", [{"role": "user", "content": "hi"}]) == "hi"
