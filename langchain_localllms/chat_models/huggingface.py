"""Chat with a Hugging Face ``transformers`` model in this process (torch or OpenVINO)."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import model_validator

from langchain_localllms.chat_models._base import LocalChatModel
from langchain_localllms.llms._base import LocalLLM, standard_names
from langchain_localllms.llms.huggingface_pipeline import HuggingFacePipeline

__all__ = ["ChatHuggingFace"]


class ChatHuggingFace(LocalChatModel):
    """A chat model over :class:`~langchain_localllms.HuggingFacePipeline`.

    Built like ``langchain_huggingface.ChatHuggingFace(llm=HuggingFacePipeline(...))``,
    or from ``HuggingFacePipeline``'s own arguments (``model_id=``, ``task=``,
    ``backend="openvino"``, ``max_new_tokens=`` ...). Messages go through the chat
    template of the model's tokenizer (``tokenizer.chat_template``), a built-in one
    for its family when it has none (Gemma), or ``chat_template=``. Tool calls and
    structured output are constrained by llguidance.

    Setup:
        .. code-block:: bash

            pip install "langchain-localllms[huggingface,grammar]"  # torch
            pip install "langchain-localllms[openvino,grammar]"     # OpenVINO

    Key init args:
        llm: a :class:`~langchain_localllms.HuggingFacePipeline` to run; or, instead,
            its arguments: ``model_id``, ``task``, ``backend`` (``"default"`` for
            torch, ``"openvino"``), ``device``, ``model_kwargs``,
            ``pipeline_kwargs``, ``temperature``, ``max_new_tokens`` (alias
            ``max_tokens``) ...
        tokenizer: a tokenizer whose chat template renders the conversation (as in
            ``langchain_huggingface``); default: the model's own.
        chat_template: a Jinja chat template to use instead.
        streaming: send tokens to callbacks during ``invoke`` too.

    Instantiate:
        .. code-block:: python

            from langchain_localllms import ChatHuggingFace, HuggingFacePipeline

            llm = HuggingFacePipeline.from_model_id(
                model_id="path/to/model",
                task="text-generation",
                pipeline_kwargs={"max_new_tokens": 64, "temperature": 0},
            )
            chat = ChatHuggingFace(llm=llm)
            # or in one step, also with backend="openvino":
            chat = ChatHuggingFace(model_id="path/to/model", temperature=0, max_tokens=64)

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

    tokenizer: Any = None
    """A tokenizer whose ``chat_template`` renders the messages, as
    ``langchain_huggingface.ChatHuggingFace`` takes one (only its template is used: the
    model's own tokenizer tokenizes). None: the model's own tokenizer's template, else
    the built-in format of the model's family. Not together with ``chat_template``."""
    _llm_class: ClassVar[type[LocalLLM]] = HuggingFacePipeline

    @model_validator(mode="before")
    @classmethod
    def _langchain_huggingface_args(cls, values: Any) -> Any:
        """``max_tokens``, ``model_id``, ``tokenizer`` and settings beside ``llm=``.

        Runs before the base class builds ``llm`` from the other arguments.
        """
        if not isinstance(values, dict):
            return values
        values = standard_names(cls._llm_class, values)  # also beside llm=
        _template_of_tokenizer(values)
        llm = values.get("llm")
        if llm is None:
            return values
        if not isinstance(llm, HuggingFacePipeline):
            msg = (
                "llm must be a langchain_localllms.HuggingFacePipeline, not "
                f"{type(llm).__module__}.{type(llm).__name__}"
            )
            raise TypeError(msg)
        model_id = values.pop("model_id", None)
        if model_id is not None and model_id != llm.model_id:
            msg = (
                f"model_id={model_id!r} is not the llm's model ({llm.model_id!r}): the chat "
                "model runs the llm's model. For another model's chat template, give "
                "tokenizer=AutoTokenizer.from_pretrained(...) or chat_template="
            )
            raise ValueError(msg)
        own = cls._own_fields()
        settings = {
            k: values.pop(k)
            for k in list(values)
            if k not in own and k in HuggingFacePipeline.model_fields
        }
        if settings:
            values["llm"] = _configured(llm, settings)
        return values

    @classmethod
    def from_model_id(
        cls, model_id: str, task: str = "text-generation", **kwargs: Any
    ) -> ChatHuggingFace:
        """Load ``model_id`` as :meth:`HuggingFacePipeline.from_model_id` does.

        Arguments of the chat class (``chat_template``, ``tokenizer``, ``callbacks``
        ...) stay with it; the others (``backend``, ``device``, ``model_kwargs``,
        ``pipeline_kwargs`` ...) go to ``HuggingFacePipeline.from_model_id``.
        """
        own = {k: kwargs.pop(k) for k in list(kwargs) if k in cls._own_fields()}
        kwargs = standard_names(cls._llm_class, kwargs)
        llm = HuggingFacePipeline.from_model_id(model_id=model_id, task=task, **kwargs)
        return cls(llm=llm, **own)


def _template_of_tokenizer(values: dict[str, Any]) -> None:
    """``tokenizer=`` gives the chat template (as langchain_huggingface uses it)."""
    tokenizer = values.get("tokenizer")
    if tokenizer is None:
        return
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or not template:
        msg = (
            f"tokenizer= ({type(tokenizer).__name__}) carries no chat_template: give "
            "chat_template= (a Jinja chat template), or leave tokenizer out to use the "
            "model's own template or its family's built-in one"
        )
        raise ValueError(msg)
    if values.get("chat_template") not in (None, template):
        msg = "give tokenizer= or chat_template=, not both (each sets the template)"
        raise ValueError(msg)
    values["chat_template"] = template


def _configured(llm: HuggingFacePipeline, settings: dict[str, Any]) -> HuggingFacePipeline:
    """A copy of ``llm`` with generation ``settings``, sharing its loaded model.

    Settings of how the model is loaded cannot change without loading it again: those
    are an error that says where they go.
    """
    loading = sorted(set(settings) & llm.load_fields())
    if loading:
        msg = (
            f"{', '.join(loading)} set how the model is loaded: give them to "
            "HuggingFacePipeline (or ChatHuggingFace without llm=), not beside llm="
        )
        raise ValueError(msg)
    copy: HuggingFacePipeline = llm.model_copy(update=settings)
    for name, value in settings.items():  # checked as the class checks its fields
        type(llm).__pydantic_validator__.validate_assignment(copy, name, value)
    return copy
