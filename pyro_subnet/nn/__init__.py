"""Torch module <-> Pyro model: :class:`BayesianNet`, flat views of the weight sites, likelihoods."""

from .bayesian_net import BayesianNet
from .bridge import BatchAwareModel, ModelBridge, as_bridge
from .functional import FunctionalNet, NetworkFunction
from .layout import SiteLayout
from .likelihoods import Bernoulli, Categorical, Gaussian, Likelihood, Normal, make_likelihood
from .validation import check_data, check_model_data

__all__ = ["BayesianNet", "ModelBridge", "BatchAwareModel", "as_bridge", "FunctionalNet", "NetworkFunction", "SiteLayout", "Likelihood",
           "Categorical", "Bernoulli", "Normal", "Gaussian", "make_likelihood", "check_data", "check_model_data"]
