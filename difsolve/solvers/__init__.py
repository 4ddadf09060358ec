"""Solvers: explicit Runge-Kutta tableaux, SDE schemes and exponential integrators."""

from .base import Solver, Step, StepContext
from .exponential import DEIS, IPNDM, DPMSolver, Multistep, UniPC
from .langevin import AnnealedLangevin, Langevin, annealed_langevin
from .runge_kutta import RK4, Bosh3, ButcherTableau, Dopri5, Euler, ExplicitRK, Heun, Midpoint
from .sde import EDMStochasticHeun, EulerMaruyama, StochasticHeun
from .stochastic import DDIM, DPMSolverSDE, EulerAncestral, SASolver

__all__ = [
    "DDIM",
    "DEIS",
    "IPNDM",
    "RK4",
    "AnnealedLangevin",
    "Bosh3",
    "ButcherTableau",
    "DPMSolver",
    "DPMSolverSDE",
    "Dopri5",
    "EDMStochasticHeun",
    "Euler",
    "EulerAncestral",
    "EulerMaruyama",
    "ExplicitRK",
    "Heun",
    "Langevin",
    "Midpoint",
    "Multistep",
    "SASolver",
    "Solver",
    "Step",
    "StepContext",
    "StochasticHeun",
    "UniPC",
    "annealed_langevin",
]
