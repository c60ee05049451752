"""Every Python block in docs/*.md runs, in order, one namespace per page.

A page whose first line is ``<!-- runs-in: NAME -->`` runs in that environment only
(``LOCALLLMS_DOCS_ENV=NAME``; e.g. ``openvino`` in .venv-openvino); others in ``main``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
ENV = os.environ.get("LOCALLLMS_DOCS_ENV", "main")


def _runs_in(text: str) -> str:
    m = re.match(r"<!-- runs-in: (\w+) -->", text)
    return m.group(1) if m else "main"


PAGES = sorted(
    p for p in DOCS.glob("*.md") if BLOCK.search(p.read_text()) and _runs_in(p.read_text()) == ENV
)


@pytest.mark.parametrize("page", PAGES, ids=[p.stem for p in PAGES])
def test_page_runs(page: Path) -> None:
    namespace: dict = {"__name__": f"docs.{page.stem}"}
    text = page.read_text()
    for block in BLOCK.finditer(text):
        line = text.count("\n", 0, block.start()) + 2
        code = compile(block.group(1), f"{page}:{line}", "exec")
        exec(code, namespace)  # our own documentation


@pytest.mark.skipif(ENV != "main", reason="counted once, from the main environment")
def test_reliability_counts_are_the_suites() -> None:
    # docs/reliability.md's table is what the suite holds, never typed by hand.
    script = DOCS.parent / "scripts" / "reliability_counts.py"
    done = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
