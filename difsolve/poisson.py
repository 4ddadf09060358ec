"""PFGM++ in one import: the process (:mod:`difsolve.processes.poisson`) and its fields
(:mod:`difsolve.fields.poisson`)."""

from .fields.poisson import PoissonField, RTimeODE, denoiser_from_field
from .processes.poisson import Poisson, _lgamma_shift, log_t_kernel

__all__ = ["Poisson", "PoissonField", "RTimeODE", "_lgamma_shift", "denoiser_from_field",
           "log_t_kernel"]
