"""Data-annealed Sequential Monte Carlo over network weights.

``resampling`` (schemes), ``schedules`` (the data path and the rules that walk it), ``kernels``
(MALA/HMC moves over all particles), ``annealed`` (``init``/``step``), ``api`` (``AnnealedSMC``).
"""

from .annealed import AnnealedTarget, Move, SMCInfo, SMCState, init, resample, step
from .api import AnnealedSMC
from .resampling import multinomial, stratified, systematic
from .schedules import Adaptive, DataPath, Linear, log_ess

__all__ = ["AnnealedSMC", "AnnealedTarget", "Move", "SMCInfo", "SMCState", "init", "step", "resample",
           "multinomial", "stratified", "systematic", "Adaptive", "Linear", "DataPath", "log_ess"]
