"""difsolve: numerical SDE/ODE solvers for diffusion and score-based generative models.

Data flows one way: a **process** (how data was noised) and a **field** (the score of the noised
data) make **dynamics** (reverse SDE or probability-flow ODE); a **solver** advances dynamics by one
step; :func:`solve` drives any solver with a step schedule or controller. :func:`sample` is a thin
recipe on top. See ``docs/`` for the mathematics and for how to choose a solver.
"""

from . import convergence, distributed, problems
from ._errors import ArgumentTypeError, DifsolveError, IncompatibleError, InvalidArgumentError
from .brownian import BrownianPath
from .control import SCHEDULES, Controller, Decision, PIController, Proposal
from .dynamics import LogSigmaTime, ProbabilityFlowODE, ReverseSDE
from .fields import (
    ClassifierFreeGuidance,
    Denoiser,
    GaussianMixture,
    GaussianMixtureField,
    ScoreField,
    ScoreNetwork,
)
from .fields.diffusers import diffusers_timesteps, from_diffusers
from .fields.network import DiscreteDenoiser
from .fields.poisson import PoissonField
from .graphs import CapturedSolve
from .integrate import LoopState, solve
from .likelihood import ExactTrace, Hutchinson, LogLikelihood, log_likelihood
from .noise import BridgedNoise, FreshNoise, NoiseSource
from .processes import EDM, VE, VP, DiscreteVP, Poisson, Process, RectifiedFlow, SubVP
from .restart import Restart, restart_sample
from .sample import sample
from .solution import Solution, Stats, Status
from .solvers import (
    DDIM,
    DEIS,
    IPNDM,
    RK4,
    AnnealedLangevin,
    Bosh3,
    ButcherTableau,
    Dopri5,
    DPMSolver,
    DPMSolverSDE,
    EDMStochasticHeun,
    Euler,
    EulerAncestral,
    EulerMaruyama,
    Heun,
    Langevin,
    Midpoint,
    SASolver,
    Solver,
    StochasticHeun,
    UniPC,
    annealed_langevin,
)
from .tuning import Pilots, TuningInfo, draw_pilots, tune_candidates, tune_method, tune_schedule

__version__ = "0.1.0"

__all__ = [
    "DDIM",
    "DEIS",
    "EDM",
    "IPNDM",
    "RK4",
    "SCHEDULES",
    "VE",
    "VP",
    "AnnealedLangevin",
    "ArgumentTypeError",
    "Bosh3",
    "BridgedNoise",
    "BrownianPath",
    "ButcherTableau",
    "CapturedSolve",
    "ClassifierFreeGuidance",
    "Controller",
    "DPMSolver",
    "DPMSolverSDE",
    "Decision",
    "Denoiser",
    "DifsolveError",
    "DiscreteDenoiser",
    "DiscreteVP",
    "Dopri5",
    "EDMStochasticHeun",
    "Euler",
    "EulerAncestral",
    "EulerMaruyama",
    "ExactTrace",
    "FreshNoise",
    "GaussianMixture",
    "GaussianMixtureField",
    "Heun",
    "Hutchinson",
    "IncompatibleError",
    "InvalidArgumentError",
    "Langevin",
    "LogLikelihood",
    "LogSigmaTime",
    "LoopState",
    "Midpoint",
    "NoiseSource",
    "PIController",
    "Pilots",
    "Poisson",
    "PoissonField",
    "ProbabilityFlowODE",
    "Process",
    "Proposal",
    "RectifiedFlow",
    "Restart",
    "ReverseSDE",
    "SASolver",
    "ScoreField",
    "ScoreNetwork",
    "Solution",
    "Solver",
    "Stats",
    "Status",
    "StochasticHeun",
    "SubVP",
    "TuningInfo",
    "UniPC",
    "annealed_langevin",
    "convergence",
    "diffusers_timesteps",
    "distributed",
    "draw_pilots",
    "from_diffusers",
    "log_likelihood",
    "problems",
    "restart_sample",
    "sample",
    "solve",
    "tune_candidates",
    "tune_method",
    "tune_schedule",
]
