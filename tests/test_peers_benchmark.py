"""``benchmarks/peers.py`` (smoke mode, custom methods) and ``benchmarks/es_variants.py`` (the ES-variant screen)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import peers  # noqa: E402

from lightning_nobp.data import fashion_mnist_available  # noqa: E402

HAVE_EVOTORCH = importlib.util.find_spec("evotorch") is not None


@pytest.mark.slow
def test_smoke_mode_writes_report_and_plot(tmp_path: Path) -> None:
    report = peers.main(["--smoke", "--budget", "0.6", "--out", str(tmp_path)])
    assert report is not None
    written = json.loads((tmp_path / "peers_digits.json").read_text())
    assert (tmp_path / "peers_digits.png").stat().st_size > 10_000
    ran = {row["method"] for row in written["methods"]}
    expected = {"backprop", "mezo", "eggroll", "openes"}
    if HAVE_EVOTORCH:
        expected |= {"evotorch-snes", "evotorch-pgpe"}
    else:
        assert "EvoTorch is not installed" in written["skipped"]["evotorch-snes"]
    assert ran == expected
    checksums = {round(row["initial_checksum"], 3) for row in written["methods"]}
    assert len(checksums) == 1, f"methods started from different weights: {checksums}"
    for row in written["methods"]:
        assert row["training_seconds"] >= 0.6 and row["steps"] >= 1
        assert row["sample_forwards_per_s"] > 0
        assert row["curve"][0][0] == 0.0 and len(row["curve"]) >= 2
        assert set(row["time_to"]) == {"0.95", "0.97"}
        assert 0.0 <= row["final_accuracy"] <= 1.0
    backprop = next(row for row in written["methods"] if row["method"] == "backprop")
    assert backprop["final_accuracy"] > backprop["curve"][0][1]  # it learned something in 0.6 s


def test_clock_excludes_evaluation_time() -> None:
    import time

    def slow_evaluation() -> float:
        time.sleep(0.05)
        return 0.5

    clock = peers.TrainingClock(0.2, slow_evaluation)
    clock.start()
    while not clock.tick(10):
        time.sleep(0.01)
    assert len(clock.curve) >= 3  # several checkpoints were evaluated, 50 ms each
    assert clock.evaluation_seconds >= 0.05 * (len(clock.curve) - 1)
    assert 0.2 <= clock.elapsed() < 0.2 + 0.05  # the clock stopped within one step of the budget


def _touch_anonymous_memory(mib: int, hold_s: float = 0.0) -> None:
    """Map ``mib`` MiB of fresh pages (outside malloc's heap), write every page, optionally hold them, unmap."""
    import mmap
    import time

    size = mib * 1024 * 1024
    block = mmap.mmap(-1, size)
    page = mmap.PAGESIZE
    for offset in range(0, size, page):
        block[offset] = 1
    time.sleep(hold_s)
    block.close()


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc/self/clear_refs")
def test_resident_memory_catches_a_brief_peak_without_a_thread() -> None:
    memory = peers.ResidentMemory()
    memory.start()
    assert not memory.sampled and memory._thread is None  # the kernel keeps the peak: nothing runs beside training
    _touch_anonymous_memory(96)  # mapped, written and returned within the same call
    peak = memory.stop()["peak_rss_above_start_mib"]
    assert 90 <= peak < 200, peak


def test_resident_memory_samples_where_the_kernel_peak_cannot_be_reset(monkeypatch) -> None:
    monkeypatch.setattr(peers.ResidentMemory, "_reset_kernel_peak", staticmethod(lambda: False))
    memory = peers.ResidentMemory()
    memory.start()
    assert memory.sampled and memory._thread is not None
    _touch_anonymous_memory(64, hold_s=0.1)  # held for 20 sampling periods
    peak = memory.stop()["peak_rss_above_start_mib"]
    assert 60 <= peak < 200, peak
    assert not memory._thread.is_alive()


def test_summary_reads_the_curve() -> None:
    clock = peers.TrainingClock(180.0, lambda: 0.0)
    clock.curve = [(0.0, 0.1), (9.0, 0.7), (10.5, 0.81), (31.0, 0.86), (125.0, 0.84), (179.0, 0.86), (180.2, 0.85)]
    clock.samples, clock.steps = 1000, 10
    row = peers.summarize(peers.DATASETS["fashion"], 180.0, clock)
    assert row["accuracy_at"]["10"] == 0.81 and row["accuracy_at"]["30"] == 0.86 and row["accuracy_at"]["180"] == 0.85
    assert row["time_to"] == {"0.8": 10.5, "0.85": 31.0}
    assert row["mean_last_third"] == pytest.approx((0.84 + 0.86 + 0.85) / 3)


def test_fashion_is_skipped_with_a_message_when_absent(monkeypatch, tmp_path: Path, capsys) -> None:
    import lightning_nobp.data

    monkeypatch.setattr(lightning_nobp.data, "fashion_mnist_available", lambda *a, **k: False)
    assert peers.main(["--dataset", "fashion", "--budget", "1", "--out", str(tmp_path)]) is None
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


def test_unknown_method_names_the_choices() -> None:
    with pytest.raises(SystemExit):
        peers.main(["--smoke", "--methods", "backprop,sgd-magic"])


def test_same_initial_weights_for_every_method() -> None:
    spec = peers.DATASETS["digits"]
    first, second = peers.build_model(spec, 0), peers.build_model(spec, 0)
    for a, b in zip(first.parameters(), second.parameters()):
        assert torch.equal(a, b)


@pytest.mark.skipif(not HAVE_EVOTORCH, reason="needs EvoTorch: pip install -e '.[bench]'")
def test_evotorch_sample_forwards_count_the_short_last_minibatch() -> None:
    spec = peers.DATASETS["digits"]
    train, test = spec.load()
    short = TensorDataset(*(tensor[:300] for tensor in train.tensors))  # minibatches of 256 and 44 rows in turn
    method = peers.EvoTorchMethod("EvoTorch SNES", "SNES", popsize=8)
    clock = method.run(spec, (short, test), budget=0.3, seed=0, clock_name="wall")["clock"]
    steps = clock.steps - 1  # the first tick comes before any step
    assert steps >= 2
    rows = 256 * ((steps + 1) // 2) + 44 * (steps // 2)
    assert clock.samples == 8 * rows


def test_custom_algorithm_and_lr(tmp_path: Path) -> None:
    arguments = ["--smoke", "--budget", "0.3", "--methods", "custom", "--out", str(tmp_path), "--lr", "0.02"]
    report = peers.main([*arguments, "--algorithm", "EggRoll(population=8, sigma=0.02)"])
    assert report is not None and report["user_lr"] == 0.02
    (row,) = report["methods"]
    assert row["label"] == "EggRoll(population=8, sigma=0.02)"
    assert "population=8" in row["describe"] and "Adam lr 0.02" in row["describe"]


@pytest.mark.parametrize("expression", ["EggRoll(8)", "os.system('x')", "Backprop()", "EggRoll(population=n)"])
def test_bad_algorithm_expressions_are_refused(expression: str) -> None:
    with pytest.raises(ValueError, match="--algorithm"):
        peers.algorithm_method(expression)


@pytest.mark.skipif(
    not fashion_mnist_available(),
    reason="Fashion-MNIST absent: apt-get install dataset-fashion-mnist",
)
@pytest.mark.parametrize("noise", ["full", "input_subspace"])
def test_es_variants_screen_learns_fashion_mnist(noise: str) -> None:
    import es_variants

    torch.manual_seed(0)
    second_moment = torch.randn(20, 20)
    second_moment = second_moment @ second_moment.T
    basis = es_variants.top_subspace(second_moment, 3)
    assert torch.allclose(basis.T @ basis, torch.eye(3), atol=1e-5)
    largest = torch.linalg.eigvalsh(second_moment)[-1]
    assert torch.allclose((basis.T @ second_moment @ basis).diagonal().max(), largest, rtol=1e-4)
    result = es_variants.run(noise, 16, 32, 3e-3, 0.01, 60, 0.0, 0, 0)
    accuracies = [row["accuracy"] for row in result["curve"]]
    assert len(accuracies) == 8 and accuracies[-1] > 0.4  # ten classes: chance is 0.1
