"""Chat with a GGUF model run by llama.cpp in this process."""

from __future__ import annotations

from typing import ClassVar

from langchain_localllms.chat_models._base import LocalChatModel
from langchain_localllms.llms._base import LocalLLM
from langchain_localllms.llms.llamacpp import LlamaCpp

__all__ = ["ChatLlamaCpp"]


class ChatLlamaCpp(LocalChatModel):
    """A chat model over :class:`~langchain_localllms.LlamaCpp`: same arguments.

    Messages go through the GGUF's own chat template (``tokenizer.chat_template``), or
    a built-in one for its family when the file has none (Gemma), or ``chat_template=``.
    Tool calls and structured output are constrained by llama.cpp grammars.

    Instantiate:
        .. code-block:: python

            from langchain_localllms import ChatLlamaCpp

            chat = ChatLlamaCpp(model_path="gemma-3-270m-Q4_K_M.gguf", temperature=0)
            chat.invoke("Name a colour.")
    """

    _llm_class: ClassVar[type[LocalLLM]] = LlamaCpp
