"""Forward noising processes ``x_t = a(t) x_0 + b(t) z`` (see :mod:`difsolve.processes.base`)."""

from .base import Process, SigmaTime
from .discrete import DiscreteVP
from .edm import EDM
from .flow import RectifiedFlow
from .poisson import Poisson
from .score_sde import VE, VP, SubVP

__all__ = ["EDM", "VE", "VP", "DiscreteVP", "Poisson", "Process", "RectifiedFlow", "SigmaTime",
           "SubVP"]
