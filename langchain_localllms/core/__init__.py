"""What every runtime shares, with no LangChain in it.

``events`` (what an engine emits), ``requests`` (what it takes), ``engine`` (the
protocol engines speak), ``stops``, ``detok``, ``threads`` (the one native thread per
runtime), ``http`` (local servers' transport), ``files`` / ``hub`` / ``imports``
(models on disk, the Hugging Face cache, optional runtimes) and ``errors``. Nothing
here imports another part of the package (``tests/unit_tests/test_layers.py``).
"""
