"""Embedded data sets and generated toy problems (nothing is downloaded)."""

from .datasets import (LOADERS, Dataset, load, load_breast_cancer, load_diabetes, load_digits,
                       load_wine)
from .toy import ConjugateRegression, conjugate_regression, gap_regression, two_moons
from .uci import UCI_FOLDERS, hidden_units, load_uci, num_splits

__all__ = ["Dataset", "LOADERS", "load", "load_digits", "load_breast_cancer", "load_wine",
           "load_diabetes", "gap_regression", "two_moons", "load_uci", "num_splits",
           "hidden_units", "UCI_FOLDERS", "conjugate_regression", "ConjugateRegression"]
