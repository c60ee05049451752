"""Chat with a model converted for CTranslate2, run in this process."""

from __future__ import annotations

from typing import ClassVar

from langchain_localllms.chat_models._base import LocalChatModel
from langchain_localllms.llms._base import LocalLLM
from langchain_localllms.llms.ctranslate2 import CTranslate2

__all__ = ["ChatCTranslate2"]


class ChatCTranslate2(LocalChatModel):
    """A chat model over :class:`~langchain_localllms.CTranslate2`: same arguments.

    Messages go through the Hugging Face tokenizer's chat template
    (``tokenizer_config.json``), a built-in one for the model's family when it has
    none (Gemma), or ``chat_template=``.

    CTranslate2 has no hook into decoding, so no grammar constrains tool calls or
    structured output. Instead the prompt ends with the opening of the answer (the
    call up to its arguments, or ``{``), decoding stops where the JSON value ends,
    and the answer is parsed and validated: an answer that is not a valid call is a
    ``ToolCallError`` that says what is wrong, never a wrong call.

    Setup:
        .. code-block:: bash

            pip install "langchain-localllms[ctranslate2]"
            ct2-transformers-converter --model <hf-dir> --output_dir <ct2-dir>

    Key init args:
        model_path: The converted model's directory.
        tokenizer_name: The Hugging Face tokenizer (defaults to ``model_path``).
        max_length, sampling_temperature, sampling_topk, ...: as ``CTranslate2``.

    Instantiate:
        .. code-block:: python

            from langchain_localllms import ChatCTranslate2

            chat = ChatCTranslate2(model_path="gemma-ct2", max_length=64)

    Invoke:
        .. code-block:: python

            chat.invoke("Name a colour.").content

    Stream:
        .. code-block:: python

            for chunk in chat.stream("The capital of France is"):
                print(chunk.content, end="")

    Async:
        .. code-block:: python

            await chat.ainvoke("Name a colour.")
    """

    _llm_class: ClassVar[type[LocalLLM]] = CTranslate2
