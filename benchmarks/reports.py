"""Writing a benchmark's report: the JSON printed and saved, its folder created."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(report: dict, out: Path) -> dict:
    """Print ``report`` as indented JSON and write it to ``out`` (creating its folder); returns the report.

    Args:
        report: the benchmark's results.
        out: the JSON file to write.
    """
    text = json.dumps(report, indent=2)
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    return report
