"""Embedded data sets and generated toy problems (nothing is downloaded)."""

from .datasets import (LOADERS, Dataset, load, load_breast_cancer, load_diabetes, load_digits,
                       load_wine)
from .toy import gap_regression, two_moons

__all__ = ["Dataset", "LOADERS", "load", "load_digits", "load_breast_cancer", "load_wine",
           "load_diabetes", "gap_regression", "two_moons"]
