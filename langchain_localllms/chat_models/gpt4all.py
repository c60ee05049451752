"""Chat with a GGUF model run by GPT4All in this process."""

from __future__ import annotations

from typing import ClassVar

from langchain_localllms.chat_models._base import LocalChatModel
from langchain_localllms.llms._base import LocalLLM
from langchain_localllms.llms.gpt4all import GPT4All

__all__ = ["ChatGPT4All"]


class ChatGPT4All(LocalChatModel):
    """A chat model over :class:`~langchain_localllms.GPT4All`: same arguments.

    Messages go through the GGUF's own chat template (``tokenizer.chat_template``,
    read from the file), a built-in one for the model's family when it has none, or
    ``chat_template=``.

    gpt4all's bindings take no grammar, so tool calls and structured output are not
    constrained: the prompt ends with the opening of the answer (the call up to its
    arguments, or ``{``), decoding stops where the JSON value ends, and the answer is
    parsed and validated. An answer that is not a valid call is a ``ToolCallError``
    that says what is wrong, never a wrong call.

    Setup:
        .. code-block:: bash

            pip install "langchain-localllms[gpt4all]"

    Key init args:
        model: The ``.gguf`` file.
        n_ctx, n_threads, device: how the engine runs it.
        max_tokens, temp, top_k, top_p, repeat_penalty: sampling.

    Instantiate:
        .. code-block:: python

            from langchain_localllms import ChatGPT4All

            chat = ChatGPT4All(model="model.gguf", max_tokens=64)

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

    _llm_class: ClassVar[type[LocalLLM]] = GPT4All
