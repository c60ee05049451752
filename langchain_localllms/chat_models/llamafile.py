"""Chat with a llamafile, or any llama.cpp HTTP server, through ``/completion``.

The conversation is rendered here, in the model's own template (the one the server
reports in ``/props``, read once per instance), and sent to ``/completion`` with the
grammar that constrains tool calls and structured output: one path, the same as the
in-process runtimes take. The server's own chat routes are not used: for a model file
without a template, llama.cpp renders ChatML (``/apply-template`` turns Gemma's
conversation into ``<|im_start|>`` turns), where this class uses the family's own
format; see ``docs/chat_llamafile.md`` for what was measured.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from pydantic import model_validator

from langchain_localllms.chat_models._base import LocalChatModel
from langchain_localllms.llms._base import LocalLLM, standard_names
from langchain_localllms.llms.llamafile import Llamafile
from langchain_localllms.prompts import FORMATS, ModelInfo, chat_format

__all__ = ["ChatLlamafile"]

#: The template llama.cpp's server reports (and chats with) when the model file
#: carries none: ChatML, whatever the model was trained on.
LLAMA_CPP_FALLBACK = (
    "{%- for message in messages -%}\n"
    "  {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "  {{- '<|im_start|>assistant\\n' -}}\n"
    "{%- endif -%}"
)


def squeezed(text: str) -> str:
    """The template without whitespace; its escaped newlines read as newlines."""
    return "".join(text.replace("\\n", "\n").split())


class ChatLlamafile(LocalChatModel):
    """A chat model over :class:`~langchain_localllms.Llamafile`: same arguments.

    Talks to a llamafile (``--server``) or llama.cpp's ``llama-server`` over
    ``POST /completion``. The messages are rendered here in the chat template the
    server reports (``GET /props``, asked once per instance): the model file's own,
    or, when the file carries none (the server then reports llama.cpp's ChatML
    fallback), the built-in format of the model's family, read from the GGUF header
    when the server runs on this machine (Gemma's turns for the Gemma GGUF here).
    Tool calls and structured output are constrained by the server's grammars.

    Setup:
        .. code-block:: bash

            ./your-model.llamafile --server --nobrowser   # or: llama-server -m model.gguf

    Key init args:
        base_url: where the server listens (``http://localhost:8080``).
        n_predict: most tokens per answer (alias ``max_tokens``; 256 by default).
        temperature, top_k, top_p, seed, ...: sampling (unset: the server's defaults).
        request_timeout: seconds to wait for the server (alias ``timeout``).
        chat_template: a Jinja chat template to use instead of the server's.
        llm: a ready :class:`~langchain_localllms.Llamafile`, instead of its arguments.

    Instantiate:
        .. code-block:: python

            from langchain_localllms import ChatLlamafile

            chat = ChatLlamafile(base_url="http://localhost:8080", temperature=0)

    Invoke:
        .. code-block:: python

            chat.invoke([("system", "Answer briefly."), ("human", "Name a colour.")])

    Stream:
        .. code-block:: python

            for chunk in chat.stream("Name a colour."):
                print(chunk.content, end="", flush=True)

    Async:
        .. code-block:: python

            await chat.ainvoke("Name a colour.")
            await chat.abatch(["Name a colour.", "Name a fruit."])
    """

    _llm_class: ClassVar[type[LocalLLM]] = Llamafile

    @model_validator(mode="before")
    @classmethod
    def _llamafile_names(cls, values: Any) -> Any:
        """LangChain's standard ``max_tokens`` and ``timeout``, as Llamafile names them.

        Runs before the base class builds ``llm`` from the other arguments.
        """
        if not isinstance(values, dict):
            return values
        values = dict(values)
        llm = values.get("llm")
        if llm is not None and not isinstance(llm, Llamafile):
            msg = (
                "llm must be a langchain_localllms.Llamafile, not "
                f"{type(llm).__module__}.{type(llm).__name__}"
            )
            raise TypeError(msg)
        if llm is None:
            return standard_names(Llamafile, values)
        renamed = {k: own for k, own in Llamafile.standard_fields().items() if own not in (None, k)}
        for standard, own in renamed.items():
            if values.get(standard) is not None:
                msg = f"{standard}= beside llm= is not applied: give {own}= to the Llamafile"
                raise ValueError(msg)
        return {k: v for k, v in values.items() if k not in renamed}

    def _template(self) -> tuple[str, ModelInfo]:
        template, info = super()._template()
        if self.chat_template is None:
            template = served_template(info) or template
        return template, info


def served_template(info: ModelInfo) -> str | None:
    """The template to use for what the server reports, where it is not the file's own.

    ``--chat-template NAME`` makes llama.cpp report the bare name: the built-in format
    of that name. llama.cpp's ChatML fallback (the file has none): the built-in format
    of the model's family, if there is one. None: the reported template as it is.
    """
    served = info.chat_template
    if served is None:
        return None
    if "{{" not in served and "{%" not in served:
        if served in FORMATS:
            return FORMATS[served]
        msg = (
            f"the server names its chat template {served!r} (--chat-template), which is "
            f"not one built in here ({', '.join(sorted(FORMATS))}): give chat_template= "
            "(a Jinja chat template)"
        )
        raise ValueError(msg)
    if squeezed(served) == squeezed(LLAMA_CPP_FALLBACK):
        return chat_format(dataclasses.replace(info, chat_template=None))
    return None
