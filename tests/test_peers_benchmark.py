"""``benchmarks/comparisons/peers.py`` (smoke mode, custom methods) and ``benchmarks/comparisons/es_variants.py``
(the ES-variant screen)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "comparisons"))

import peers  # noqa: E402

from lightning_nobp.data import fashion_mnist_available  # noqa: E402

HAVE_EVOTORCH = importlib.util.find_spec("evotorch") is not None


#: matrix-product FLOPs per row of one backprop step of the digits MLP 64-128-10: the forward (2 x 9,472), the
#: weight gradients of both layers (2 x 9,472) and the input gradient of the second layer only (2 x 1,280)
BACKPROP_FLOPS_PER_ROW = 2 * 9472 + 2 * 9472 + 2 * 1280


@pytest.mark.slow
def test_smoke_mode_writes_report_and_plot(tmp_path: Path) -> None:
    report = peers.main(["--smoke", "--budget", "0.6", "--out", str(tmp_path), "--seeds", "0,1"])
    assert report is not None
    written = json.loads((tmp_path / "peers_digits.json").read_text())
    assert (tmp_path / "peers_digits.png").stat().st_size > 10_000
    assert not (tmp_path / "peers_digits.partial.json").exists()
    expected = set(peers.DEFAULT_METHODS)
    if not HAVE_EVOTORCH:
        expected.discard("evotorch-snes")
        assert "EvoTorch is not installed" in written["skipped"]["evotorch-snes"]
    assert {row["method"] for row in written["methods"]} == expected
    assert {(row["method"], row["seed"]) for row in written["runs"]} == {(m, s) for m in expected for s in (0, 1)}
    for seed in (0, 1):
        checksums = {round(row["initial_checksum"], 3) for row in written["runs"] if row["seed"] == seed}
        assert len(checksums) == 1, f"methods started from different weights: {checksums}"
    assert written["machine"]["torch"] == torch.__version__ and written["machine"]["cpu_model"]
    assert written["validation"]["rows"] == round(1438 * peers.VALIDATION_FRACTION)
    for row in written["runs"]:
        assert row["training_seconds"] >= 0.6 and row["steps"] >= 1
        assert row["sample_forwards_per_s"] > 0 and row["flops_per_s"] > 0
        assert row["curve"][0][0] == 0.0 and len(row["curve"]) >= 2
        assert set(row["time_to"]) == {"0.95", "0.97"}
        assert 0.0 <= row["test_accuracy"] <= 1.0
    for summary in written["methods"]:
        assert summary["test_accuracy"]["n"] == 2 and summary["seeds"] == [0, 1]
        values = [r["test_accuracy"] for r in written["runs"] if r["method"] == summary["method"]]
        assert summary["test_accuracy"]["mean"] == pytest.approx(sum(values) / 2)
    backprop = [row for row in written["runs"] if row["method"] == "backprop"]
    assert all(row["flops_per_row"] == BACKPROP_FLOPS_PER_ROW for row in backprop)
    assert all(row["final_accuracy"] > row["curve"][0][1] for row in backprop)  # it learned something in 0.6 s
    # the published methods' rows say so; the defaults' rows name their extras and the bias
    labels = {row["method"]: row["label"] for row in written["methods"]}
    assert "as published" in labels["eggroll-plain"] and "as published" in labels["mezo-plain"]
    for name in ("mezo", "eggroll", "openes"):
        assert "input subspace" in labels[name] and "biased" in labels[name]
    assert "8 directions" in labels["mezo"] and "per-row head" in labels["eggroll"]


def test_published_rows_run_the_published_methods() -> None:
    eggroll = peers.METHODS["eggroll-plain"].strategy().algorithm
    assert eggroll.rank == 1 and eggroll.antithetic and eggroll.fitness_shaping == "centered_rank"
    assert not eggroll.extras.per_row_estimates and eggroll.extras.input_subspace is None  # extras=None: all off
    assert "extras=None" in repr(eggroll)
    mezo = peers.METHODS["mezo-plain"].strategy().algorithm
    assert mezo.directions == 1 and mezo.input_subspace is None
    default = peers.METHODS["eggroll"].strategy().algorithm
    assert default.extras is not None and default.extras.per_row_estimates and default.extras.input_subspace == 0.97


def test_validation_split_is_fixed_and_disjoint() -> None:
    train, validation, test = peers.DATASETS["digits"].load()
    again = peers.DATASETS["digits"].load()
    assert torch.equal(validation.tensors[0], again[1].tensors[0])
    assert len(validation) == round(1438 * 0.15) and len(train) + len(validation) == 1438 and len(test) == 359
    rows = {tuple(row.tolist()) for row in train.tensors[0]}
    assert not any(tuple(row.tolist()) in rows for row in validation.tensors[0][:50])


def test_sustained_threshold_waits_for_the_moving_mean_to_stay() -> None:
    curve = [(0.0, 0.1), (1.0, 0.96), (2.0, 0.9), (3.0, 0.96), (4.0, 0.97), (5.0, 0.96), (6.0, 0.97), (7.0, 0.96)]
    assert peers.time_to(curve, 0.95) == 1.0  # the first crossing
    # moving means of 5: 3.0 -> 0.745, 4.0 -> 0.79, 5.0 -> 0.95, 6.0 -> 0.956, 7.0 -> 0.964
    assert peers.sustained_time_to(curve, 0.95) == 5.0
    assert peers.sustained_time_to(curve, 0.99) is None
    assert peers.sustained_time_to([*curve, (8.0, 0.5)], 0.95) is None  # it must stay above until the end


def test_spread_and_aggregate() -> None:
    stats = peers.spread([0.9, None, 1.0])
    assert stats["mean"] == pytest.approx(0.95) and stats["std"] == pytest.approx(0.0707107, rel=1e-5)
    assert (stats["n"], stats["of"], stats["min"], stats["max"]) == (2, 3, 0.9, 1.0)
    assert peers.spread([None])["mean"] is None


def test_plain_es_estimate_points_along_the_gradient() -> None:
    """With many members the rank-1 antithetic estimate of a linear classifier correlates with its true gradient."""
    import plain_es

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 4))
    x, y = torch.randn(64, 8), torch.randint(0, 4, (64,))
    loss = torch.nn.functional.cross_entropy(net(x), y)
    (true_gradient,) = torch.autograd.grad(loss, [net[0].weight])
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)  # keeps the weights: only the estimate is read
    es = plain_es.LowRankES(net, optimizer, population=4096, sigma=1e-3, generator=torch.Generator().manual_seed(1))
    losses = es.step(x, y)
    assert losses.shape == (4096,) and torch.allclose(losses.mean(), loss.detach(), atol=1e-3)
    cosine = torch.nn.functional.cosine_similarity(net[0].weight.grad.flatten(), true_gradient.flatten(), dim=0)
    assert cosine > 0.5, cosine
    ranks = plain_es.centered_ranks(torch.tensor([3.0, -1.0, 2.0]))
    assert ranks.tolist() == [0.5, -0.5, 0.0]


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
    clock.samples, clock.steps, clock.rows, clock.flops_per_row = 1000, 10, 100, 50.0
    row = peers.summarize(peers.DATASETS["fashion"], 180.0, clock)
    assert row["accuracy_at"]["10"] == 0.81 and row["accuracy_at"]["30"] == 0.86 and row["accuracy_at"]["180"] == 0.85
    assert row["first_crossing"] == {"0.8": 10.5, "0.85": 31.0}
    # moving means of 5 at 125, 179 and 180.2 s: 0.662, 0.814, 0.844: 80 % sustained from 179 s, 85 % never
    assert row["time_to"] == {"0.8": 179.0, "0.85": None}
    assert row["mean_last_third"] == pytest.approx((0.84 + 0.86 + 0.85) / 3)
    assert row["flops"] == 5000.0 and row["flops_per_s"] == pytest.approx(5000.0 / row["training_seconds"])


def test_fashion_is_skipped_with_a_message_when_absent(monkeypatch, tmp_path: Path, capsys) -> None:
    import lightning_nobp.data

    monkeypatch.setattr(lightning_nobp.data, "fashion_mnist_available", lambda *a, **k: False)
    assert peers.main(["--dataset", "fashion", "--budget", "1", "--out", str(tmp_path)]) is None
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_fashion_path_runs_on_a_tiny_fake(monkeypatch, tmp_path: Path) -> None:
    """The Fashion-MNIST code path (784 inputs, its thresholds, the validation split) on 600 fake images."""
    import lightning_nobp.data

    generator = torch.Generator().manual_seed(0)

    def fake(split: str) -> TensorDataset:
        rows = 500 if split == "train" else 100
        features = torch.rand(rows, 784, generator=generator)
        return TensorDataset(features, torch.randint(0, 10, (rows,), generator=generator))

    monkeypatch.setattr(lightning_nobp.data, "fashion_mnist_available", lambda *a, **k: True)
    monkeypatch.setattr(lightning_nobp.data, "load_fashion_mnist", fake)
    arguments = ["--dataset", "fashion", "--budget", "0.3", "--in-process", "--out", str(tmp_path)]
    report = peers.main([*arguments, "--methods", "backprop,eggroll-plain,plain-es"])
    assert report is not None and report["dataset"] == "fashion" and report["mlp"] == "784-256-10"
    assert report["validation"]["rows"] == 75 and report["thresholds"] == [0.8, 0.85]
    assert all(row["split_rows"] == {"train": 425, "validation": 75, "test": 100} for row in report["runs"])
    assert (tmp_path / "peers_fashion.json").is_file()
    assert all(row["flops_per_s"] > 0 for row in report["runs"])


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
    train, validation, test = spec.load()
    short = TensorDataset(*(tensor[:300] for tensor in train.tensors))  # minibatches of 256 and 44 rows in turn
    method = peers.EvoTorchMethod("EvoTorch SNES", "SNES", popsize=8)
    clock = method.run(spec, (short, validation, test), budget=0.3, seed=0, clock_name="wall")["clock"]
    steps = clock.steps - 1  # the first tick comes before any step
    assert steps >= 2
    rows = 256 * ((steps + 1) // 2) + 44 * (steps // 2)
    assert clock.samples == 8 * rows and clock.rows == rows
    assert clock.flops_per_row == 8 * 2 * 9472  # every member's forward through the 64-128-10 MLP, nothing else


def test_evotorch_search_settings_reach_the_method() -> None:
    method = peers.resolve_method("evotorch-snes", {"evotorch": {"popsize": 50, "stdev_init": 0.1}})
    assert method.popsize == 50 and method.options["stdev_init"] == 0.1
    assert "popsize 50" in method.label and "searched on validation" in method.label


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
