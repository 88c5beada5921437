"""How well an EggRoll step's estimate points along the true gradient, with and without per-row estimates.

On the Fashion-MNIST MLP (784-256-10, batch 256; sklearn digits with ``--dataset digits``) the script takes the
weights at initialization and after ``--warmup`` steps of backprop + Adam (the reference gradient comes from
autograd; the estimates never use it), then for ``--trials`` population seeds computes ``EggRoll()``'s estimate
through ``PopulationEstimator`` (batched, as the strategy does) and reports, per parameter, the mean cosine
similarity with the true gradient of the same batch. JSON to ``--out``.

    python benchmarks/row_estimates.py
    python benchmarks/row_estimates.py --dataset digits --population 64
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lightning_nobp.algorithms import EggRoll
from lightning_nobp.perturb import PopulationEstimator


def _data(dataset: str) -> tuple[torch.Tensor, torch.Tensor]:
    if dataset == "digits":
        from lightning_nobp.data import load_digits_split

        train, _ = load_digits_split()
    else:
        from lightning_nobp.data import load_fashion_mnist

        train = load_fashion_mnist("train")
    return train.tensors[0].reshape(len(train), -1).float(), train.tensors[1]


def cosines(net: nn.Sequential, x: torch.Tensor, y: torch.Tensor, population: int, per_row: bool, seed: int) -> list:
    """Cosine of each parameter's estimate with its true gradient, for one population seed."""
    params = list(net.parameters())
    for param in params:
        param.grad = None
    true = torch.autograd.grad(F.cross_entropy(net(x), y), params)
    algorithm = EggRoll(population=population, per_row_estimates=per_row)
    estimator = PopulationEstimator(algorithm, [net], params)
    estimator.row_estimates = per_row

    def loss() -> torch.Tensor:
        return F.cross_entropy(net(x), y)

    members = algorithm.ask(seed)
    with torch.no_grad():
        estimator.probe_parameter_reads(members, loss)
        fitness = estimator.evaluate_members(members, loss)
        estimate = algorithm.tell(members, fitness)
        estimator.accumulate_gradient(members, estimate.coefficients)
    result = [float(F.cosine_similarity(p.grad.flatten(), g.flatten(), dim=0)) for p, g in zip(params, true)]
    for param in params:
        param.grad = None
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=("fashion", "digits"), default="fashion")
    parser.add_argument("--population", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=600, help="backprop + Adam steps before the second check")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "row_estimates")
    args = parser.parse_args()
    torch.set_num_threads(1)
    x_all, y_all = _data(args.dataset)
    torch.manual_seed(0)
    hidden = 128 if args.dataset == "digits" else 256
    net = nn.Sequential(nn.Linear(x_all.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, 10))
    names = [name for name, _ in net.named_parameters()]
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    report: dict = {"options": vars(args) | {"out": str(args.out)}, "checkpoints": []}
    for stage, steps in (("initialization", 0), (f"after {args.warmup} backprop steps", args.warmup)):
        for _ in range(steps):
            index = torch.randint(0, len(x_all), (256,))
            optimizer.zero_grad()
            F.cross_entropy(net(x_all[index]), y_all[index]).backward()
            optimizer.step()
        index = torch.randint(0, len(x_all), (256,), generator=torch.Generator().manual_seed(1))
        x, y = x_all[index], y_all[index]
        row = {"stage": stage}
        for per_row in (False, True):
            trials = torch.tensor([cosines(net, x, y, args.population, per_row, seed) for seed in range(args.trials)])
            row["per_row" if per_row else "mean_loss"] = dict(zip(names, trials.mean(0).tolist()))
        report["checkpoints"].append(row)
        print(f"{stage}:")
        for name in names:
            print(f"  {name:10s} cosine: mean losses {row['mean_loss'][name]:.3f}, per-row {row['per_row'][name]:.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.dataset}-p{args.population}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
