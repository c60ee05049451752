"""Progress on long work: a bar on a terminal, nothing printed in CI and logs."""

from __future__ import annotations

import io
import logging
import sys
import time

import pytest

from langchain_localllms.core.files import progress, progress_bar, working


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Log(io.StringIO):
    def isatty(self) -> bool:
        return False


@pytest.mark.parametrize("stream", [Terminal, Log])
def test_work_without_steps_ticks_on_a_terminal_only_and_is_always_logged(
    stream, monkeypatch, caplog
):
    err = stream()
    monkeypatch.setattr(sys, "stderr", err)
    caplog.set_level(logging.INFO, logger="langchain_localllms")
    with working("converting tiny to CTranslate2"):
        time.sleep(1.2)  # two ticks
    shown = err.getvalue()
    if stream is Terminal:
        assert "converting tiny to CTranslate2: 00:01" in shown
    else:
        assert shown == ""
    assert "converting tiny to CTranslate2 ..." in caplog.text
    assert "converting tiny to CTranslate2: done in 1." in caplog.text


@pytest.mark.parametrize("stream", [Terminal, Log])
def test_byte_bars_and_messages_follow_the_same_rule(stream, monkeypatch, caplog):
    err = stream()
    monkeypatch.setattr(sys, "stderr", err)
    caplog.set_level(logging.INFO, logger="langchain_localllms")
    with progress_bar("pulling sha256:abc", total=3 * 2**20, unit="B") as bar:
        bar.update(3 * 2**20)
    progress("using the cached conversion")
    shown = err.getvalue()
    if stream is Terminal:
        assert "pulling sha256:abc" in shown
        assert "3.00M/3.00M" in shown
        assert "using the cached conversion" in shown
    else:
        assert shown == ""
    assert "using the cached conversion" in caplog.text


def test_an_error_in_the_work_ends_the_bar_and_reaches_the_caller(monkeypatch):
    monkeypatch.setattr(sys, "stderr", Terminal())
    with pytest.raises(RuntimeError, match="boom"), working("exporting"):
        raise RuntimeError("boom")
