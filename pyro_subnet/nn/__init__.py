"""Torch module <-> Pyro model: :class:`BayesianNet`, flat views of the weight sites, likelihoods."""

from .bayesian_net import BayesianNet
from .functional import FunctionalNet
from .layout import SiteLayout
from .likelihoods import Categorical, Gaussian, Likelihood, make_likelihood
from .validation import check_data

__all__ = ["BayesianNet", "FunctionalNet", "SiteLayout", "Likelihood", "Categorical", "Gaussian",
           "make_likelihood", "check_data"]
