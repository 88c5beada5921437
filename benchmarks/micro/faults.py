"""The fault-injection report: runs ``tests/faults`` and prints how many faults of each kind were injected and
whether any guarantee broke (a run killed and resumed, a torn or corrupted checkpoint, ranks that disagree or die,
numbers that go bad). Exits with 1 when anything was lost.

    python benchmarks/micro/faults.py
    python benchmarks/micro/faults.py --out faults.json -k kill_resume
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_suite(report: Path, selection: str | None) -> int:
    """Run the suite, writing the fault ledger to ``report``; returns pytest's exit code.

    Args:
        report: where the suite's ``conftest.py`` writes the ledger (``FAULTS_REPORT``).
        selection: a pytest ``-k`` expression, or ``None`` for every case.
    """
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:logging", "tests/faults"]
    if selection:
        command += ["-k", selection]
    env = dict(os.environ, FAULTS_REPORT=str(report), TORCHAO_FORCE_SKIP_LOADING_SO_FILES="1")
    return subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, check=False).returncode


def format_report(ledger: dict[str, dict]) -> list[str]:
    """The table: fault kind, faults injected, tests, outcome; then the verdict."""
    width = max([len("fault"), *map(len, ledger)])
    lines = [f"{'fault':<{width}}  injected  tests  outcome"]
    for kind in sorted(ledger):
        entry = ledger[kind]
        outcome = "nothing lost" if not entry["failed"] else f"LOST ({', '.join(entry['failed'])})"
        if entry.get("known"):
            outcome += f"; {len(entry['known'])} known issue(s)"
        lines.append(f"{kind:<{width}}  {entry['injected']:>8}  {len(entry['tests']):>5}  {outcome}")
    total = sum(entry["injected"] for entry in ledger.values())
    lost = any(entry["failed"] for entry in ledger.values())
    lines.append(f"{total} faults injected in {len(ledger)} kinds: {'SOMETHING WAS LOST' if lost else 'nothing lost'}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="also write the ledger as JSON")
    parser.add_argument("-k", dest="selection", help="run only the cases matching this pytest expression")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "faults.json"
        code = run_suite(report, args.selection)
        if not report.exists():
            print(f"the suite wrote no report (pytest exit code {code})")
            sys.exit(1)
        ledger = json.loads(report.read_text())
    for line in format_report(ledger):
        print(line)
    if args.out:
        args.out.write_text(json.dumps(ledger, indent=2))
    lost = any(entry["failed"] for entry in ledger.values())
    sys.exit(1 if lost or code not in (0,) else 0)


if __name__ == "__main__":
    main()
