import importlib
import subprocess
import sys

import pytest

from langchain_localllms.core import imports as _imports


def test_missing_runtime_names_the_extra(monkeypatch):
    real = importlib.import_module

    def fake(name, *args):
        if name == "gpt4all":
            raise ImportError("No module named 'gpt4all'")
        return real(name, *args)

    monkeypatch.setattr(_imports.importlib, "import_module", fake)
    with pytest.raises(
        ImportError, match=r'GPT4All needs .*pip install "langchain-localllms\[gpt4all\]"'
    ) as e:
        _imports.require("gpt4all", feature="GPT4All")
    assert isinstance(e.value.__cause__, ImportError)


def test_package_import_loads_no_runtime():
    code = (
        "import sys, langchain_localllms as m; m.Grammar; m.LlamaCpp;"
        "heavy = [x for x in ('llama_cpp','torch','transformers','ctranslate2','gpt4all','optimum')"
        " if x in sys.modules]; assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
