"""Train an MLP on scikit-learn's digits with MeZO (no backpropagation) and print its test accuracy.

python recipes/digits_mezo.py            # about 30 s on 2 CPU cores
python recipes/digits_mezo.py --smoke    # a few seconds, for tests
"""

from __future__ import annotations

import argparse
import time

import lightning.pytorch as pl
import torch

from lightning_nobp import NoBackpropStrategy
from lightning_nobp.algorithms import MeZO
from lightning_nobp.data import DigitsDataModule
from lightning_nobp.models import MLPClassifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-epochs", type=int, default=600, help="epochs of 12 steps (batch 128)")
    parser.add_argument("--lr", type=float, default=3e-4, help="SGD learning rate")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    parser.add_argument("--eps", type=float, default=1e-3, help="MeZO perturbation scale")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights and perturbations")
    parser.add_argument("--smoke", action="store_true", help="train 5 epochs only (a quick check that it runs)")
    args = parser.parse_args()

    torch.set_num_threads(2)
    pl.seed_everything(args.seed)
    data = DigitsDataModule(batch_size=128)
    model = MLPClassifier(
        in_features=64, hidden=128, num_classes=10, optimizer="sgd", lr=args.lr, momentum=args.momentum
    )
    trainer = pl.Trainer(
        strategy=NoBackpropStrategy(algorithm=MeZO(eps=args.eps)),
        accelerator="cpu",
        devices=1,
        max_epochs=5 if args.smoke else args.max_epochs,
        check_val_every_n_epoch=50,
        logger=False,
        enable_checkpointing=False,
    )
    start = time.perf_counter()
    trainer.fit(model, data)
    seconds = time.perf_counter() - start
    accuracy = trainer.test(model, data, verbose=False)[0]["test_acc"]
    print(f"digits MeZO: test accuracy {accuracy:.4f} after {trainer.global_step} steps ({seconds:.1f} s of training)")


if __name__ == "__main__":
    main()
