"""Print the docs test's counts at the end of the session, whatever the capture mode."""

from __future__ import annotations

from typing import Any


def pytest_terminal_summary(terminalreporter: Any) -> None:
    from tests.docs.test_docs import RESULTS

    if not RESULTS:
        return
    totals: dict[str, int] = {}
    for counts in RESULTS.values():
        for key, value in counts.items():
            totals[key] = totals.get(key, 0) + value
    terminalreporter.write_sep("-", f"docs as tests: {len(RESULTS)} pages")
    terminalreporter.write_line(", ".join(f"{v} {k}" for k, v in totals.items()))
