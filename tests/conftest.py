"""Shared fixtures: devices (CPU always, CUDA when present), dtypes, Hypothesis profiles.

Profiles: ``ci`` (default, fast) and ``thorough``; choose with ``DIFSOLVE_HYPOTHESIS_PROFILE``.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=12, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile(
    "thorough", max_examples=200, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("DIFSOLVE_HYPOTHESIS_PROFILE", "ci"))

# the tests use small tensors: threads only contend for the CPU (2 cores in CI)
torch.set_num_threads(1)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Every device available: CPU always, CUDA when present."""
    return torch.device(request.param)


@pytest.fixture(params=[torch.float32, torch.float64], ids=["f32", "f64"])
def dtype(request) -> torch.dtype:
    return request.param


def pytest_report_header(config):
    return (f"difsolve devices: {DEVICES}; hypothesis profile: "
            f"{os.environ.get('DIFSOLVE_HYPOTHESIS_PROFILE', 'ci')}; torch {torch.__version__}")
