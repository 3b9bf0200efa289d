"""Data-annealed Sequential Monte Carlo over network weights.

``resampling`` (schemes), ``data_schedules`` (the data path and the rules that walk it),
``kernels`` (MALA/HMC moves over all particles), ``proposal_covariance`` (their proposal
covariance), ``particle_likelihood`` (log-likelihoods of all particles at once), ``annealed``
(``init``/``step``), ``annealed_smc`` (``AnnealedSMC``, the ``MCMC``-like shell).
"""

from .annealed import AnnealedTarget, Move, SMCInfo, SMCState, init, resample, step
from .annealed_smc import AnnealedSMC
from .resampling import multinomial, stratified, systematic
from .data_schedules import Adaptive, DataPath, Linear, log_ess

__all__ = ["AnnealedSMC", "AnnealedTarget", "Move", "SMCInfo", "SMCState", "init", "step", "resample",
           "multinomial", "stratified", "systematic", "Adaptive", "Linear", "DataPath", "log_ess"]
