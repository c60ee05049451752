"""The runtime engines: everything that touches a runtime, with no LangChain types.

An engine loads its model, tokenizes, and generates pieces for one prompt or a batch
(with stops, grammars, usage and cancellation). The LangChain classes in ``llms/``
(and the chat classes to come) are faces over the same engine.
"""
