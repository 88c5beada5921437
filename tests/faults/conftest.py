"""The fault ledger: every test records the faults it injects; the summary says how many per kind and whether any
guarantee broke (``FAULTS_REPORT=path`` also writes it as JSON, for ``benchmarks/micro/faults.py``)."""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

#: kind -> {"injected": faults, "tests": test ids, "failed": test ids whose guarantee broke, "known": expected failures}
LEDGER: dict[str, dict[str, Any]] = defaultdict(
    lambda: {"injected": 0, "tests": set(), "failed": set(), "known": set()}
)
_KINDS_OF_TEST: dict[str, set[str]] = defaultdict(set)


class FaultLedger:
    """Counts the faults one test injects."""

    def __init__(self, test_id: str) -> None:
        self.test_id = test_id

    def inject(self, kind: str, count: int = 1) -> None:
        """Record ``count`` faults of ``kind`` injected by this test.

        Args:
            kind: what went wrong (``"SIGKILL mid-epoch"``, ``"NaN loss"``, ...).
            count: how many such faults.
        """
        LEDGER[kind]["injected"] += count
        LEDGER[kind]["tests"].add(self.test_id)
        _KINDS_OF_TEST[self.test_id].add(kind)


@pytest.fixture
def faults(request: pytest.FixtureRequest) -> FaultLedger:
    """The ledger of the faults this test injects."""
    return FaultLedger(request.node.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" and not report.failed:
        return
    for kind in _KINDS_OF_TEST.get(item.nodeid, ()):
        if hasattr(report, "wasxfail"):  # a known, documented shortfall (strict xfail)
            LEDGER[kind]["known"].add(item.nodeid)
        elif report.failed:
            LEDGER[kind]["failed"].add(item.nodeid)


def summary_lines() -> list[str]:
    """The report: faults injected per kind, and whether anything was lost."""
    if not LEDGER:
        return []
    width = max(len(kind) for kind in LEDGER)
    lines = [f"{'fault':<{width}}  injected  tests  outcome"]
    for kind in sorted(LEDGER):
        entry = LEDGER[kind]
        outcome = "nothing lost" if not entry["failed"] else f"LOST in {len(entry['failed'])} test(s)"
        if entry["known"]:
            outcome += f" ({len(entry['known'])} known issue(s), xfail)"
        lines.append(f"{kind:<{width}}  {entry['injected']:>8}  {len(entry['tests']):>5}  {outcome}")
    total = sum(entry["injected"] for entry in LEDGER.values())
    lost = sorted({test for entry in LEDGER.values() for test in entry["failed"]})
    lines.append(
        f"{total} faults injected in {len(LEDGER)} kinds: "
        + ("nothing lost" if not lost else f"guarantees broken in {', '.join(lost)}")
    )
    return lines


def pytest_terminal_summary(terminalreporter: Any) -> None:
    lines = summary_lines()
    if not lines:
        return
    terminalreporter.write_sep("=", "fault injection")
    for line in lines:
        terminalreporter.write_line(line)
    report = os.environ.get("FAULTS_REPORT")
    if report:
        serializable = {
            kind: {key: sorted(value) if isinstance(value, set) else value for key, value in e.items()}
            for kind, e in LEDGER.items()
        }
        Path(report).write_text(json.dumps(serializable, indent=2))
