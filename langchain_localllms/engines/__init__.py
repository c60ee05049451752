"""The runtime engines: everything that touches a runtime, with no LangChain types.

One module or package per runtime, servers included; each speaks
:class:`~langchain_localllms.core.engine.Engine`: it loads its model (or reaches its
server), tokenizes, and generates pieces for one prompt or a native batch, with
grammars, usage and cancellation. The LangChain classes in ``llms/`` and
``chat_models/`` are faces over them. An engine imports ``core``, ``grammars`` and the
shared ``gguf`` / ``server`` modules, never a face or another runtime's engine.
"""
