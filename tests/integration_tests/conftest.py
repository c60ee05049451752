"""Models for the integration tests come from the offline model kit (built on demand)."""

from __future__ import annotations

import pytest

import modelkit


@pytest.fixture(scope="session")
def model_path():
    """``model_path("gemma-gguf")`` -> path of that kit artifact, building it if needed."""
    return modelkit.prepare


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the standard tests a suite class expects to fail (``chat_suite.Expected``)."""
    for item in items:
        cls = getattr(item, "cls", None)
        expected = getattr(cls, "XFAIL", None) or {}
        # by the test's name with its parameters ("test_x[pydantic]"), or of all of them
        reason = expected.get(item.name) or expected.get(getattr(item, "originalname", ""))
        if reason:
            item.add_marker(pytest.mark.xfail(reason=reason, strict=cls.XFAIL_STRICT))
