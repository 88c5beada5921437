"""Run a forward-only recipe and its backprop twin for the same wall-clock budget; write JSON and a PNG of the curves.

python benchmarks/comparisons/compare.py recipes/digits-eggroll.yaml --budget 120  # twin: recipes/digits-backprop.yaml
python benchmarks/comparisons/compare.py recipes/digits-eggroll.yaml --smoke       # seconds: a few steps of each

The PNG (needs matplotlib: ``pip install -e ".[plots]"``) plots the validation metric against training seconds and
against forward passes (a backprop step counts one forward; it also runs a backward of about two forwards' cost).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
TWIN_PATTERN = re.compile(r"-(eggroll|mezo|openes)(-(fp8|fp8_e4m3|nvfp4|mxfp4|int8|bf16))?\.yaml$")
HELD_OUT = re.compile(r"nobp: held-out (\w+) = ([-\d.eE+naif]+)")
FIT = re.compile(r"nobp: fit ran (\d+) optimizer steps in ([\d.]+) s \(([\d.]+) s of CPU time")


def backprop_twin(recipe: Path) -> Path:
    """``X-eggroll[-fp8].yaml`` / ``X-mezo.yaml`` -> ``X-backprop.yaml`` (next to it)."""
    if not TWIN_PATTERN.search(recipe.name):
        raise ValueError(
            f"{recipe.name}: cannot name its backprop twin (expected X-eggroll/-mezo/-openes.yaml); pass --twin"
        )
    return recipe.with_name(TWIN_PATTERN.sub("-backprop.yaml", recipe.name))


def budget_string(seconds: float) -> str:
    """Lightning's ``max_time`` format ``DD:HH:MM:SS``."""
    whole = max(1, int(round(seconds)))
    return f"00:{whole // 3600:02d}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def run_recipe(recipe: Path, budget: float, smoke: bool, out: Path, extra: list[str]) -> dict[str, Any]:
    """Train one recipe through ``nobp fit`` in a fresh process; return its held-out metrics and timeline."""
    timeline = out / f"{recipe.stem}.timeline.json"
    command = [sys.executable, "-m", "lightning_nobp.cli", "fit", "-c", str(recipe)]
    if smoke:
        command += ["-c", str(ROOT / "recipes" / "smoke.yaml"), "--trainer.max_epochs=2", "--trainer.max_steps=6"]
    else:  # the budget is the only limit
        command += ["--trainer.max_epochs=-1", "--trainer.max_steps=-1"]
    command += [
        f"--trainer.max_time={budget_string(budget)}",
        f"--trainer.default_root_dir={out / recipe.stem}",
        "--trainer.enable_progress_bar=false",
        f"--timeline={timeline}",
        *extra,
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    started = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    (out / f"{recipe.stem}.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    held_out = {name: float(value) for name, value in HELD_OUT.findall(result.stdout)}
    fit = FIT.search(result.stdout)
    return {
        "recipe": str(recipe.relative_to(ROOT) if recipe.is_relative_to(ROOT) else recipe),
        "held_out": held_out,
        "steps": int(fit.group(1)) if fit else None,
        "fit_seconds": float(fit.group(2)) if fit else None,
        "fit_cpu_seconds": float(fit.group(3)) if fit else None,
        "process_seconds": wall,
        "timeline": json.loads(timeline.read_text()) if timeline.is_file() else [],
    }


def validation_key(run: dict[str, Any]) -> str | None:
    """The timeline's metric matching the held-out one (``test_acc`` -> ``val_acc``)."""
    keys = [k for record in run["timeline"] for k in record if k.startswith("val_")]
    for name in run["held_out"]:
        candidate = "val_" + name.removeprefix("test_")
        if candidate in keys:
            return candidate
    return keys[0] if keys else None


def plot(report: dict[str, Any], path: Path) -> bool:
    """Validation metric against training seconds and against forward passes, one line per run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        print("matplotlib is not installed (pip install -e '.[plots]'): no PNG written", file=sys.stderr)
        return False
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, run in report["runs"].items():
        key = validation_key(run)
        if key is None:
            continue
        points = [r for r in run["timeline"] if key in r]
        for axis, x in zip(axes, ("seconds", "forwards")):
            axis.plot([r[x] for r in points], [r[key] for r in points], marker="o", label=f"{label}: {run['recipe']}")
            axis.set_ylabel(key)
    axes[0].set_xlabel("training seconds (validation excluded)")
    axes[1].set_xlabel("forward passes (backprop also runs one backward per step)")
    axes[1].set_xscale("log")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(f"{Path(report['recipe']).stem} vs its backprop twin, {report['budget_seconds']:.0f} s each")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", type=Path, help="the forward-only recipe (YAML)")
    parser.add_argument("--twin", type=Path, default=None, help="the backprop recipe (default: X-backprop.yaml)")
    parser.add_argument("--budget", type=float, default=120.0, help="wall-clock seconds of fit for each run")
    parser.add_argument("--smoke", action="store_true", help="a few steps of each (recipes/smoke.yaml)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results/NAME)")
    parser.add_argument("extra", nargs="*", help="further `nobp fit` arguments for both runs, after --")
    args = parser.parse_args(argv)
    recipe = args.recipe.resolve()
    twin = (args.twin or backprop_twin(recipe)).resolve()
    for path in (recipe, twin):
        if not path.is_file():
            parser.error(f"{path} does not exist")
    out = (args.out or ROOT / "benchmarks" / "results" / recipe.stem).resolve()
    out.mkdir(parents=True, exist_ok=True)
    budget = 30.0 if args.smoke else args.budget
    report: dict[str, Any] = {"recipe": str(recipe), "twin": str(twin), "budget_seconds": budget, "smoke": args.smoke}
    report["runs"] = {
        "no-backprop": run_recipe(recipe, budget, args.smoke, out, args.extra),
        "backprop": run_recipe(twin, budget, args.smoke, out, args.extra),
    }
    (out / "compare.json").write_text(json.dumps(report, indent=1))
    report["png"] = str(out / "compare.png") if plot(report, out / "compare.png") else None
    for label, run in report["runs"].items():
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in run["held_out"].items())
        print(f"{label:12s} {run['recipe']}: {metrics} after {run['steps']} steps, {run['fit_seconds']} s of fit")
    print(f"wrote {out / 'compare.json'}" + (f" and {report['png']}" if report["png"] else ""))
    return report


if __name__ == "__main__":
    main()
