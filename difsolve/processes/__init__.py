"""Forward noising processes ``x_t = a(t) x_0 + b(t) z`` (see :mod:`difsolve.processes.base`)."""

from .base import Process, SigmaTime
from .edm import EDM
from .poisson import Poisson
from .score_sde import VE, VP, SubVP

__all__ = ["EDM", "VE", "VP", "Poisson", "Process", "SigmaTime", "SubVP"]
