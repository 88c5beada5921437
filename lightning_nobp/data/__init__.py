"""DataModules used by the recipes; every dataset installs offline."""

from lightning_nobp.data.digits import DigitsDataModule, load_digits_split

__all__ = ["DigitsDataModule", "load_digits_split"]
