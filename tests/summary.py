"""A line of figures printed at the end of a test module, past pytest's output capture (the fuzz
tests report how many inputs they generated and what came back)."""

from __future__ import annotations

import pytest


def write_summary(request: pytest.FixtureRequest, line: str) -> None:
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(line)
