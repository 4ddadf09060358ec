"""Small tensor helpers shared across difsolve (broadcasting per-sample time, norms)."""

from __future__ import annotations

import math

import numpy as np
import torch

from ._errors import ArgumentTypeError, InvalidArgumentError, check

TimeLike = float | int | torch.Tensor


def bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """View a per-sample ``(B,)`` tensor so that it broadcasts against ``x`` of shape ``(B, ...)``.

    A value shared by the batch stored once (a stride-0 ``(B,)`` view, as the fixed loop passes
    its shared grid) becomes a 0-d view: the elementwise kernels then take it as a scalar, about
    twice as fast as a broadcast ``(B, 1, ...)`` operand."""
    if v.ndim == 0:
        return v
    if v.ndim == 1 and v.stride(0) == 0 and v.shape[0] > 0:
        return v[0]
    return v.reshape(v.shape[0], *([1] * (x.ndim - 1)))


def where_rows(mask: torch.Tensor, new: tuple, old: tuple) -> tuple:
    """``torch.where(mask, new_i, old_i)`` per row for each pair (``mask``: ``(B,)``). The mask
    is expanded to each distinct shape once: a materialised mask makes every ``where`` several
    times faster than a broadcast one where rows are small, and costs one pass. On the CPU,
    where reading the mask on the host costs nothing, a mask that is all true (all false)
    returns ``new`` (``old``) without a pass: a CPU ``where`` is several times slower per
    element than an addition."""
    if host_reads_free(mask) and mask.numel():
        if bool(mask.all()):
            return tuple(new)
        if not bool(mask.any()):
            return tuple(old)
    masks: dict = {}
    out = []
    for n, o in zip(new, old):
        if n.ndim <= 1:
            out.append(torch.where(mask, n, o))
            continue
        m = masks.get(n.shape)
        if m is None:
            m = masks[n.shape] = bcast(mask, n).expand(n.shape).contiguous()
        out.append(torch.where(m, n, o))
    return tuple(out)


def host_reads_free(t: torch.Tensor) -> bool:
    """Whether reading a value of ``t`` on the host costs nothing: a CPU tensor in eager mode (on
    accelerators a read synchronises the device; under ``torch.compile`` it breaks the graph)."""
    return t.device.type == "cpu" and not _compiling()


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return compiler.is_compiling()
    return torch._dynamo.is_compiling()  # torch < 2.3


def time_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype times and step sizes are kept in for states of ``dtype``: at least float32
    (a bfloat16 grid cannot tell 0.97 from 0.969)."""
    return torch.promote_types(dtype, torch.float32)


def as_time(t: TimeLike, x: torch.Tensor, name: str = "t",
            dtype: torch.dtype | None = None) -> torch.Tensor:
    """Return ``t`` as a ``(B,)`` tensor on the device of ``x``, in ``dtype`` (default x's).

    A Python number or a 0-d tensor is broadcast to every sample; a ``(B,)`` tensor is used as is.
    """
    batch = x.shape[0]
    dtype = dtype or x.dtype
    if isinstance(t, bool):
        raise ArgumentTypeError(f"argument `{name}` must be a number or a tensor, got {t!r}")
    if isinstance(t, (int, float)) or _is_numpy_number(t):
        t = float(t) if not isinstance(t, int) or abs(t) < 2**1000 else math.inf
        check(not abs(t) > torch.finfo(dtype).max, name, f"a time representable in {dtype}", t)
        return torch.full((batch,), t, device=x.device, dtype=dtype)
    if not isinstance(t, torch.Tensor) or t.is_complex():
        raise ArgumentTypeError(f"argument `{name}` must be a number or a real tensor, got {t!r}")
    t = t.to(device=x.device, dtype=dtype)
    if t.ndim == 0:
        return t.expand(batch).clone()
    check(t.shape == (batch,), name, f"a number or a tensor of shape ({batch},)", tuple(t.shape))
    return t


def check_output(value, like: torch.Tensor, name: str, what: str = "return", *,
                 cast: bool = True) -> torch.Tensor:
    """A user callable's output ``value`` for the state ``like``: a floating-point tensor of
    ``like``'s shape and device, cast to ``like``'s dtype (``cast=False``: of ``like``'s dtype
    already). Metadata only: no synchronisation. The one output check of difsolve: fields,
    dynamics, norms and network adapters all use it.

    Raises :class:`ArgumentTypeError` / :class:`InvalidArgumentError` naming ``name`` (a field
    returning ``(B, 1)`` would otherwise be broadcast silently, a tuple fail deep inside)."""
    if type(value) is torch.Tensor and value.shape == like.shape and value.dtype == like.dtype \
            and value.device == like.device:
        return value  # the common case, decided in one line
    if not isinstance(value, torch.Tensor):
        hint = (" (a tuple or model-output object: return the tensor, e.g. `.sample`; "
                "ds.from_diffusers unwraps diffusers models)"
                if isinstance(value, (tuple, list)) or hasattr(value, "sample") else "")
        raise ArgumentTypeError(
            f"argument `{name}` must {what} a torch.Tensor of the shape of x "
            f"{tuple(like.shape)}, got {type(value).__name__}{hint}")
    if cast and not value.is_floating_point():
        raise ArgumentTypeError(
            f"argument `{name}` must {what} a floating-point tensor, got {value.dtype}")
    if value.shape != like.shape:
        raise InvalidArgumentError(
            f"argument `{name}` must {what} a tensor of the shape of x {tuple(like.shape)}, got "
            f"an output of shape {tuple(value.shape)}")
    if not cast and value.dtype != like.dtype:
        raise InvalidArgumentError(
            f"argument `{name}` must {what} a tensor of the dtype of x ({like.dtype}), got an "
            f"output of dtype {value.dtype}")
    if value.device != like.device:
        raise InvalidArgumentError(
            f"argument `{name}` must {what} a tensor on x's device {like.device}, got "
            f"{value.device}")
    return value.to(like.dtype)


def rms(x: torch.Tensor) -> torch.Tensor:
    """Root-mean-square over every dimension but the first: shape ``(B,)``."""
    return _by_row(x).square().mean(dim=1).sqrt()


def flat_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over every dimension but the first: shape ``(B,)``."""
    return _by_row(x).sum(dim=1)


def all_finite(x: torch.Tensor, *more: torch.Tensor) -> torch.Tensor:
    """Per-sample finiteness flag ``(B,)`` of ``x`` (and of ``more``, tensors of its shape), no
    host synchronisation. ``v - v`` is 0 exactly where ``v`` is finite (NaN for inf and NaN), so
    the test is one subtraction per tensor and one comparison, exact in every dtype."""
    zero = x - x
    for other in more:
        zero = zero + (other - other)
    return (_by_row(zero) == 0).all(dim=1)


def sum_is_finite(*tensors: torch.Tensor) -> bool:
    """Whether the sum of every element of ``tensors`` is finite, read on the host (one
    synchronisation): a sufficient test that every element is finite (an overflow of finite
    values fails it too, so a False asks for the exact per-row test)."""
    total = tensors[0].sum()
    for other in tensors[1:]:
        total = total + other.sum()
    return math.isfinite(total.item())


def _by_row(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``(B, n)`` (also for an empty batch, where ``reshape(B, -1)`` is ambiguous)."""
    return x.flatten(1) if x.ndim > 1 else x[:, None]


def _is_numpy_number(value) -> bool:
    return isinstance(value, (np.integer, np.floating)) and not isinstance(value, np.bool_)
