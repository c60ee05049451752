"""Models for the integration tests come from the offline model kit (built on demand)."""

from __future__ import annotations

import pytest

import modelkit


@pytest.fixture(scope="session")
def model_path():
    """``model_path("gemma-gguf")`` -> path of that kit artifact, building it if needed."""
    return modelkit.prepare
