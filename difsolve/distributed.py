r"""Sampling, likelihoods and studies at scale over a ``torch.distributed`` process group.

A job of ``N`` items (samples, data points, paths of a study) is indexed ``0 .. N-1``. Rank ``r``
of the ``W`` ranks of the current process group owns the contiguous block of global indices
``[r N // W, (r + 1) N // W)`` (shares differ by at most one item) and runs it in chunks of at
most ``batch_size`` items. Every item carries its own random stream: ``seeds[i]`` (default
``seed + i``) is passed to :func:`~difsolve.sample` / :func:`~difsolve.log_likelihood` as the
per-row seed, so item ``i``'s result does not depend on ``W``, on the rank that computed it or on
the chunk size (bitwise on CPU, where the per-row computation is batch-independent).

Nothing is initialised here: the functions use the process group the user started
(``torch.distributed.init_process_group``, e.g. under ``torchrun``; Gloo on CPU, NCCL on CUDA) or
the ``group`` passed, and run single-process when ``torch.distributed`` is not initialised.

After every chunk the ranks exchange a failure flag (one ``all_reduce``), so a rank whose chunk
raises stops the job on every rank with a :class:`DistributedError` naming the failing rank and
its error, instead of leaving the others blocked in a collective. Every collective waits at most
``timeout`` (default: the process group's own timeout).

Results are gathered in global index order on every rank (``gather="all"``), on rank 0 only
(``gather="rank0"``; the other ranks get ``None``) or written to one file per rank
(``gather="out/part-{rank}.pt"``; each rank returns its own share; :func:`load` reassembles them).
Gathering concatenates per-row tensors along the batch dimension and sums integer counters:
a gathered :class:`~difsolve.Stats` has ``nfe`` = the total number of batched field calls of all
chunks on all ranks, and ``nfe_per_sample``, ``steps``, ``accepted``, ``rejected`` per row.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import pickle
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from ._errors import ArgumentTypeError, DifsolveError, IncompatibleError, check, check_int
from .fields.gaussian_mixture import GaussianMixtureField
from .likelihood import log_likelihood as _log_likelihood
from .noise import check_seeds
from .sample import sample as _sample
from .solution import Solution

__all__ = [
    "DistributedError",
    "Estimate",
    "bits_per_dim",
    "default_seeds",
    "load",
    "log_likelihood",
    "map_chunks",
    "mean",
    "sample",
    "shard",
]

#: batch dimension of dataclass fields that are not batch-first (``None``: one value per job)
_BATCH_DIMS: dict[type, dict[str, int | None]] = {Solution: {"xs": 1, "ts": None}}
_MESSAGE_BYTES = 4000  # longest error message sent to the other ranks


class DistributedError(DifsolveError):
    """A rank of a sharded job failed (or a collective timed out); raised on every rank.

    ``failed_ranks`` lists the ranks whose work raised; on a failing rank the original exception
    is the ``__cause__``.
    """

    def __init__(self, message: str, failed_ranks: Sequence[int] = ()):
        super().__init__(message)
        self.failed_ranks = list(failed_ranks)


# ---------------------------------------------------------------------------------------------
# the process group


class _Comm:
    """The ranks of one job: the user's process group, or a single process."""

    def __init__(self, group, timeout):
        initialised = dist.is_available() and dist.is_initialized()
        if group is not None and not initialised:
            raise IncompatibleError(
                "argument `group`: torch.distributed is not initialised; start a process group "
                "first (difsolve never initialises one) or leave `group` out")
        if timeout is not None and not isinstance(timeout, datetime.timedelta):
            seconds = timeout
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
                raise ArgumentTypeError(
                    f"argument `timeout` must be seconds or a datetime.timedelta, got {timeout!r}")
            check(math.isfinite(seconds) and 0 < seconds <= MAX_TIMEOUT_S, "timeout",
                  f"a positive number of seconds (at most {MAX_TIMEOUT_S})", seconds)
            timeout = datetime.timedelta(seconds=seconds)
        self.group, self.timeout = group, timeout
        self.rank = dist.get_rank(group) if initialised else 0
        self.world = dist.get_world_size(group) if initialised else 1
        self.device = torch.device("cpu")
        if initialised and dist.get_backend(group) == "nccl":  # NCCL moves CUDA tensors only
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.root = 0 if group is None or not initialised else dist.get_global_rank(group, 0)

    def _wait(self, work, what: str) -> None:
        try:
            if self.timeout is None:
                work.wait()
            else:
                work.wait(timeout=self.timeout)
        except RuntimeError as exc:  # timeout, or a peer that went away
            raise DistributedError(
                f"rank {self.rank}: {what} failed ({exc}); another rank may have died or not "
                "entered the same difsolve.distributed call") from exc

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            buf = tensor.to(self.device)
            self._wait(dist.all_reduce(buf, group=self.group, async_op=True), "all_reduce")
            tensor = buf.to(tensor.device)
        return tensor

    def gather(self, tensor: torch.Tensor, *, everywhere: bool) -> list[torch.Tensor] | None:
        """Each rank's ``tensor`` (same shape and dtype on every rank), on every rank or rank 0."""
        if self.world == 1:
            return [tensor]
        buf = tensor.to(self.device)
        bool_ = buf.dtype == torch.bool  # not every backend gathers bools
        buf = buf.to(torch.uint8) if bool_ else buf.contiguous()
        out = [torch.empty_like(buf) for _ in range(self.world)]
        if everywhere:
            work = dist.all_gather(out, buf, group=self.group, async_op=True)
        else:
            out = out if self.rank == 0 else None
            work = dist.gather(buf, out, dst=self.root, group=self.group, async_op=True)
        self._wait(work, "all_gather" if everywhere else "gather")
        if out is None:
            return None
        return [(o.bool() if bool_ else o).to(tensor.device) for o in out]

    def gather_bytes(self, payload: bytes) -> list[bytes]:
        """Every rank's ``payload``, on every rank."""
        if self.world == 1:
            return [payload]
        sizes = self.gather(torch.tensor([len(payload)], dtype=torch.int64), everywhere=True)
        size = max(int(s) for s in sizes)
        buf = torch.zeros(size, dtype=torch.uint8)
        buf[: len(payload)] = torch.tensor(list(payload), dtype=torch.uint8)
        parts = self.gather(buf, everywhere=True)
        return [bytes(p[: int(s)].tolist()) for p, s in zip(parts, sizes)]

    def agree(self, failure: tuple[BaseException, str] | None) -> None:
        """Collective: raise :class:`DistributedError` on every rank if any rank failed.

        ``failure`` is this rank's ``(exception, where)`` or None.
        """
        flags = torch.zeros(self.world, dtype=torch.int32)
        flags[self.rank] = failure is not None
        flags = self.all_reduce_sum(flags)
        failed = [r for r in range(self.world) if flags[r]]
        if not failed:
            return
        exc, where = failure if failure is not None else (None, "")
        own = "" if exc is None else f"rank {self.rank} failed {where}: {type(exc).__name__}: {exc}"
        messages = self.gather_bytes(own.encode()[:_MESSAGE_BYTES])
        text = "; ".join(m.decode(errors="replace") for m in messages if m)
        raise DistributedError(f"difsolve.distributed job stopped: {text}", failed) from exc


def shard(n: int, *, group=None) -> range:
    """The global indices this rank owns among ``n``: ``range(r n // W, (r + 1) n // W)``."""
    n = check_int(n, "n")
    comm = _Comm(group, None)
    return _block(n, comm.rank, comm.world)


def _block(n: int, rank: int, world: int) -> range:
    return range(rank * n // world, (rank + 1) * n // world)


#: the longest wait a collective may be given (a day)
MAX_TIMEOUT_S = 86_400


def default_seeds(n: int, seed: int = 0) -> torch.Tensor:
    """The per-item seeds used when none are given: ``seed + arange(n)`` (int64)."""
    n, seed = check_int(n, "n"), check_int(seed, "seed", minimum=0)
    return seed + torch.arange(n, dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# results as trees of per-row tensors and counters


def _flatten(obj: Any, rows: int, path: str, bdim: int | None = 0):
    """``(spec, leaves)`` of a result: tensors (batch dimension ``bdim``), ints (counters)."""
    if isinstance(obj, torch.Tensor):
        if bdim is not None and (obj.ndim <= bdim or obj.shape[bdim] != rows):
            raise ArgumentTypeError(
                f"result `{path}` has shape {tuple(obj.shape)}; a per-row tensor must have the "
                f"chunk's {rows} rows along dimension {bdim}")
        rest = tuple(s for i, s in enumerate(obj.shape) if i != bdim)
        return ("T", bdim, rest, obj.dtype), [obj]
    if obj is None:
        return ("N",), []
    if isinstance(obj, int) and not isinstance(obj, bool):
        return ("I",), [obj]
    if isinstance(obj, dict):
        keys = tuple(obj)
        parts = [_flatten(obj[k], rows, f"{path}[{k!r}]") for k in keys]
        return ("D", keys, tuple(p[0] for p in parts)), [x for p in parts for x in p[1]]
    if isinstance(obj, (list, tuple)):
        parts = [_flatten(v, rows, f"{path}[{i}]") for i, v in enumerate(obj)]
        kind = "L" if isinstance(obj, list) else "U"
        return (kind, tuple(p[0] for p in parts)), [x for p in parts for x in p[1]]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        dims = _BATCH_DIMS.get(type(obj), {})
        names = tuple(f.name for f in dataclasses.fields(obj))
        parts = [_flatten(getattr(obj, k), rows, f"{path}.{k}", dims.get(k, 0)) for k in names]
        return ("C", type(obj), names, tuple(p[0] for p in parts)), [x for p in parts
                                                                        for x in p[1]]
    raise ArgumentTypeError(
        f"result `{path}` is a {type(obj).__name__}; results must be tensors with one row per "
        "item, int counters, None, or dicts, lists, tuples and dataclasses of those")


def _unflatten(spec, leaves) -> Any:
    kind = spec[0]
    if kind in ("T", "I"):
        return next(leaves)
    if kind == "N":
        return None
    if kind == "D":
        return {k: _unflatten(s, leaves) for k, s in zip(spec[1], spec[2])}
    if kind in ("L", "U"):
        items = [_unflatten(s, leaves) for s in spec[1]]
        return items if kind == "L" else tuple(items)
    cls, names, subs = spec[1], spec[2], spec[3]
    values = {k: _unflatten(s, leaves) for k, s in zip(names, subs)}
    init = {f.name for f in dataclasses.fields(cls) if f.init}
    obj = cls(**{k: v for k, v in values.items() if k in init})
    for k in names:
        if k not in init:
            setattr(obj, k, values[k])
    return obj


def _leaf_specs(spec):
    """The ``("T", ...)`` and ``("I",)`` specs in leaf order."""
    kind = spec[0]
    if kind in ("T", "I"):
        return [spec]
    if kind == "N":
        return []
    subs = spec[3] if kind == "C" else spec[2] if kind == "D" else spec[1]
    return [leaf for s in subs for leaf in _leaf_specs(s)]


def _concat(spec, parts: list[list]) -> list:
    """Leaves of several parts (each a list of leaves of ``spec``) joined in order."""
    joined = []
    for j, leaf in enumerate(_leaf_specs(spec)):
        values = [p[j] for p in parts]
        if leaf[0] == "I":
            joined.append(sum(values))
        elif leaf[1] is None:  # one value per job (e.g. Solution.ts)
            joined.append(values[0])
        else:
            joined.append(torch.cat(values, dim=leaf[1]))
    return joined


def _merge(results: list, rows: list[int]):
    """``(spec, leaves)`` of chunk results concatenated in order."""
    flat = [_flatten(r, b, "result") for r, b in zip(results, rows)]
    spec = flat[0][0]
    for s, _ in flat[1:]:
        if s != spec:
            raise ArgumentTypeError(
                "results of different chunks have different structures, dtypes or trailing "
                "shapes; every chunk must return the same kind of result")
    return spec, _concat(spec, [leaves for _, leaves in flat])


def _gather(comm: _Comm, spec, leaves: list | None, counts: list[int], everywhere: bool):
    """The job's leaves in global index order, from each rank's own (``None``: no rows)."""
    specs = _leaf_specs(spec)
    has = [c > 0 for c in counts]
    ints = [v for s, v in zip(specs, leaves or [0] * len(specs)) if s[0] == "I"]
    int_sums = comm.all_reduce_sum(torch.tensor(ints, dtype=torch.int64)).tolist() if ints else []
    root = everywhere or comm.rank == 0
    out, k = [], 0
    for j, s in enumerate(specs):
        if s[0] == "I":
            out.append(int_sums[k])
            k += 1
            continue
        _, bdim, rest, dtype = s
        sizes = [int(h) for h in has] if bdim is None else counts
        if leaves is None:
            local = torch.empty((0, *rest), dtype=dtype, device=comm.device)
        else:
            local = leaves[j][None] if bdim is None else leaves[j].movedim(bdim, 0)
        pad = max(sizes) - local.shape[0]
        if pad:
            local = torch.cat([local, local.new_zeros((pad, *rest))])
        parts = comm.gather(local, everywhere=everywhere)
        if not root:
            continue
        if bdim is None:
            out.append(parts[has.index(True)][0])
        else:
            joined = torch.cat([p[:c] for p, c in zip(parts, counts)])
            out.append(joined.movedim(0, bdim))
    return out if root else None


def _check_gather(gather) -> str | None:
    """``"all"``, ``"rank0"``, or a per-rank path pattern (returned as a str)."""
    if isinstance(gather, str) and gather in ("all", "rank0"):
        return None
    if isinstance(gather, (str, os.PathLike)):
        pattern = os.fspath(gather)
        check("{rank}" in pattern, "gather",
              '"all", "rank0", or a file path pattern containing "{rank}"', gather)
        return pattern
    raise ArgumentTypeError(
        f'argument `gather` must be "all", "rank0" or a path pattern such as "out/part-{{rank}}'
        f'.pt", got {gather!r}')


# ---------------------------------------------------------------------------------------------
# the generic sharded map


def map_chunks(fn: Callable[[torch.Tensor], Any], n: int, *, batch_size: int,
               gather: str | os.PathLike = "all", group=None, timeout=None) -> Any:
    """Run ``fn`` on this rank's share of the global indices ``0 .. n-1``, chunk by chunk.

    Args:
        fn: called as ``fn(indices)`` with a contiguous ascending ``(b,)`` int64 CPU tensor of
            global indices, ``b <= batch_size``; returns tensors with one row per index (batch
            dimension 0, except the ``xs`` (dimension 1) and ``ts`` (one per job) of a
            :class:`~difsolve.Solution`), int counters (summed), None, or dicts, lists, tuples
            and dataclasses of those (e.g. a :class:`~difsolve.Solution` or
            :class:`~difsolve.LogLikelihood`). The result for index ``i`` must depend on ``i``
            only (derive its randomness from ``i``, e.g. ``seeds=seed + indices``).
        n: number of items in the job.
        batch_size: most items per call of ``fn``.
        gather: ``"all"``: every rank returns the whole result in global index order;
            ``"rank0"``: rank 0 does, the others return ``None``; a path pattern containing
            ``"{rank}"``: each rank writes its share with :func:`torch.save` (a dict with
            ``"n"``, ``"world_size"``, ``"rank"``, ``"indices"`` and ``"result"``) and returns
            it; :func:`load` reassembles the files.
        group: the process group (default: the default group; single process when
            ``torch.distributed`` is not initialised).
        timeout: seconds (or a ``timedelta``) each collective may wait; default: the group's.

    Raises:
        DistributedError: on every rank, when ``fn`` raised on any rank (the message names the
            rank, the global indices of its chunk and the error).
    """
    if not callable(fn):
        raise ArgumentTypeError(f"argument `fn` must be callable, got {fn!r}")
    n, batch_size = check_int(n, "n"), check_int(batch_size, "batch_size")
    pattern = _check_gather(gather)
    comm = _Comm(group, timeout)
    blocks = [_block(n, r, comm.world) for r in range(comm.world)]
    mine = blocks[comm.rank]
    rounds = max(math.ceil(len(b) / batch_size) for b in blocks)
    results, rows = [], []
    for i in range(rounds):  # every rank takes part in every round's failure check
        start = mine.start + i * batch_size
        failure = None
        if start < mine.stop:
            stop = min(start + batch_size, mine.stop)
            try:
                results.append(fn(torch.arange(start, stop, dtype=torch.int64)))
                rows.append(stop - start)
            except Exception as exc:  # reported to every rank, re-raised
                failure = (exc, f"on global indices [{start}, {stop})")
        comm.agree(failure)

    spec = leaves = None
    failure = None
    if results:
        try:
            spec, leaves = _merge(results, rows)
        except Exception as exc:  # reported to every rank, re-raised
            failure = (exc, f"merging the results of global indices [{mine.start}, {mine.stop})")
    comm.agree(failure)
    if pattern is not None:
        local = None if spec is None else _unflatten(spec, iter(leaves))
        path = pattern.format(rank=comm.rank)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        torch.save({"n": n, "world_size": comm.world, "rank": comm.rank,
                    "indices": torch.arange(mine.start, mine.stop, dtype=torch.int64),
                    "result": local}, path)
        return local

    specs = [pickle.loads(s) for s in comm.gather_bytes(pickle.dumps(spec))]
    spec = next(s for s in specs if s is not None)
    if any(s is not None and s != spec for s in specs):
        raise DistributedError(
            "difsolve.distributed job stopped: ranks returned results of different structures, "
            "dtypes or trailing shapes")
    joined = _gather(comm, spec, leaves, [len(b) for b in blocks], everywhere=gather == "all")
    return None if joined is None else _unflatten(spec, iter(joined))


def load(pattern: str | os.PathLike) -> Any:
    """Reassemble the files written by ``gather=pattern`` into the job's result (index order).

    The files are pickles (:func:`torch.load` with ``weights_only=False``): load only your own.
    """
    pattern = _check_gather(pattern)
    if pattern is None:
        raise ArgumentTypeError('argument `pattern` must be a path pattern containing "{rank}"')
    first = torch.load(pattern.format(rank=0), weights_only=False)
    world, n = first["world_size"], first["n"]
    shards = [first] + [torch.load(pattern.format(rank=r), weights_only=False)
                        for r in range(1, world)]
    covered = torch.cat([s["indices"] for s in shards])
    check(torch.equal(covered, torch.arange(n)), "pattern",
          f"the files of one job covering the indices 0 .. {n - 1} in rank order")
    flat = [_flatten(s["result"], len(s["indices"]), "result") for s in shards
            if s["result"] is not None]
    spec = flat[0][0]
    check(all(s == spec for s, _ in flat), "pattern", "files holding results of one job")
    return _unflatten(spec, iter(_concat(spec, [leaves for _, leaves in flat])))


# ---------------------------------------------------------------------------------------------
# sampling and likelihood


def _per_item(seeds, n: int, seed: int) -> torch.Tensor:
    if seeds is None:
        return default_seeds(n, seed)
    return torch.tensor(check_seeds(seeds, n), dtype=torch.int64)


def _rows(kwargs: dict, n: int, idx: torch.Tensor) -> dict:
    """``kwargs`` for one chunk: ``x_T`` and ``cond`` tensors with ``n`` rows are sliced."""
    sl = slice(int(idx[0]), int(idx[-1]) + 1)
    out = dict(kwargs)
    x_t = kwargs.get("x_T")
    if isinstance(x_t, torch.Tensor):
        check(x_t.ndim >= 1 and x_t.shape[0] == n, "x_T", f"a tensor with n={n} rows",
              tuple(x_t.shape))
        out["x_T"] = x_t[sl]
    if isinstance(kwargs.get("cond"), dict):
        out["cond"] = {k: v[sl] if isinstance(v, torch.Tensor) and v.ndim >= 1
                       and v.shape[0] == n else v for k, v in kwargs["cond"].items()}
    return out


def _refuse_generator(kwargs: dict) -> None:
    if "generator" in kwargs:
        raise IncompatibleError(
            "argument `generator`: a sharded job draws each item from its own seed (`seeds=` or "
            "`seed=`), so that its result does not depend on the ranks or the chunk size")


def _sample_shape(field, n) -> tuple[int, tuple[int, ...]]:
    if isinstance(n, (tuple, list, torch.Size)):
        check(len(n) >= 2 and all(isinstance(s, int) and s >= 1 for s in n), "n",
              "an int or a shape (N, ...) of positive ints", n)
        return n[0], tuple(n[1:])
    n = check_int(n, "n")
    if isinstance(field, GaussianMixtureField):
        return n, (field.mixture.dim,)
    raise ArgumentTypeError(
        f"argument `n`: give the shape (N, ...) of the samples, e.g. ({n}, 3, 32, 32); the "
        "sample shape of this field is not known")


def sample(field, n, *, batch_size: int, seeds=None, seed: int = 0,
           gather: str | os.PathLike = "all", group=None, timeout=None,
           **sample_kwargs) -> Solution | None:
    """Draw ``N`` samples sharded over the ranks: :func:`~difsolve.sample` per chunk.

    Args:
        field: a :class:`~difsolve.ScoreField`.
        n: the shape ``(N, ...)`` of all samples, or ``N`` for a field whose sample shape is
            known (a Gaussian-mixture field).
        batch_size: most samples per :func:`~difsolve.sample` call on a rank.
        seeds: ``N`` per-sample seeds (sequence or 1-D int tensor); default ``seed + i`` for
            sample ``i``. Sample ``i`` is ``ds.sample(field, (1, ...), seeds=[seeds[i]])``
            whatever the ranks and chunks.
        seed: base of the default seeds.
        gather, group, timeout: as in :func:`map_chunks`.
        **sample_kwargs: passed to :func:`~difsolve.sample` (``solver``, ``steps``, ...);
            an ``x_T`` of ``N`` rows and the ``N``-row tensors in ``cond`` are sliced per chunk;
            ``generator`` is refused (use ``seeds``).

    Returns:
        The gathered :class:`~difsolve.Solution` (``stats.nfe``: batched field calls summed
        over all chunks and ranks; the ``(N,)`` counters per sample), or as ``gather`` says.
    """
    total, shape = _sample_shape(field, n)
    _refuse_generator(sample_kwargs)
    all_seeds = _per_item(seeds, total, seed)

    def chunk(idx: torch.Tensor) -> Solution:
        return _sample(field, (idx.numel(), *shape), seeds=all_seeds[idx],
                       **_rows(sample_kwargs, total, idx))

    return map_chunks(chunk, total, batch_size=batch_size, gather=gather, group=group,
                      timeout=timeout)


def log_likelihood(field, data, *, batch_size: int, seeds=None, seed: int = 0,
                   gather: str | os.PathLike = "all", group=None, timeout=None, **kwargs):
    """Log-likelihoods of ``N`` data points sharded over the ranks: :func:`~difsolve.log_likelihood`
    per chunk.

    Args:
        field: a :class:`~difsolve.ScoreField`.
        data: ``(N, ...)`` tensor (every rank passes the same one; each reads its rows).
        batch_size: most data points per :func:`~difsolve.log_likelihood` call on a rank.
        seeds, seed: per-point seeds of the Hutchinson probes and dequantisation noise (default
            ``seed + i``).
        gather, group, timeout: as in :func:`map_chunks`.
        **kwargs: passed to :func:`~difsolve.log_likelihood` (``trace``, ``controller``, ...);
            ``N``-row tensors in ``cond`` are sliced per chunk; ``generator`` is refused.

    Returns:
        The gathered :class:`~difsolve.LogLikelihood` (or as ``gather`` says); summarise it with
        :func:`bits_per_dim`.
    """
    if not isinstance(data, torch.Tensor) or data.ndim < 1:
        raise ArgumentTypeError(f"argument `data` must be a tensor of shape (N, ...), got {data!r}")
    total = check_int(data.shape[0], "data", minimum=1)
    _refuse_generator(kwargs)
    all_seeds = _per_item(seeds, total, seed)

    def chunk(idx: torch.Tensor):
        rows = _rows(kwargs, total, idx)
        return _log_likelihood(field, data[int(idx[0]) : int(idx[-1]) + 1], seeds=all_seeds[idx],
                               **rows)

    return map_chunks(chunk, total, batch_size=batch_size, gather=gather, group=group,
                      timeout=timeout)


# ---------------------------------------------------------------------------------------------
# reductions


@dataclasses.dataclass(frozen=True)
class Estimate:
    r"""Mean of per-item values with standard errors (float64 tensors of the per-item shape).

    Attributes:
        mean: ``m = (1/N) sum_i v_i``.
        stderr: ``sqrt(s^2 / N)`` with ``s^2`` the sample variance (``N - 1`` in the
            denominator; NaN for ``N = 1``): the standard error of ``m`` as an estimate of the
            expectation over the population of items. When each ``v_i`` is itself a noisy
            estimate (Hutchinson probes, Monte-Carlo paths), ``s^2`` contains that noise too.
        noise_stderr: ``sqrt(sum_i e_i^2) / N`` from per-item standard errors ``e_i``, when given:
            the error of ``m`` as the average over exactly these items (e.g. the Hutchinson part
            of a test-set bits/dim); None without ``e_i``.
        n: ``N``.
    """

    mean: torch.Tensor
    stderr: torch.Tensor
    noise_stderr: torch.Tensor | None
    n: int

    def __str__(self) -> str:
        text = f"{_fmt(self.mean)} +- {_fmt(self.stderr)} (n={self.n}"
        if self.noise_stderr is not None:
            text += f", estimator noise +- {_fmt(self.noise_stderr)}"
        return text + ")"


def _fmt(t: torch.Tensor) -> str:
    return f"{float(t):.6g}" if t.numel() == 1 else str(t.tolist())


def mean(values: torch.Tensor, *, stderr: torch.Tensor | None = None, across_ranks: bool = False,
         group=None, timeout=None) -> Estimate:
    """Mean and standard errors of per-item ``values`` ``(N, ...)`` over dimension 0.

    Args:
        values: the items' values (e.g. ``ll.bits_per_dim``, or a statistic of sample paths for
            a weak-order study). NaN values (failed items) propagate to the result.
        stderr: per-item standard errors ``(N, ...)`` of noisy values (``ll.stderr``).
        across_ranks: ``values`` is this rank's share of the items (as returned with a path
            ``gather``, or computed on :func:`shard`): the statistics of the global set are
            combined over the ranks (Chan et al.'s pairwise update, in rank order). Default:
            ``values`` already holds every item (e.g. gathered with ``gather="all"``).
        group, timeout: as in :func:`map_chunks` (with ``across_ranks``).
    """
    if not isinstance(values, torch.Tensor) or values.ndim < 1:
        raise ArgumentTypeError(f"argument `values` must be a tensor of shape (N, ...), "
                                f"got {values!r}")
    v = values.detach().to(torch.float64)
    if stderr is not None:
        check(isinstance(stderr, torch.Tensor) and stderr.shape == values.shape, "stderr",
              f"a tensor of the shape of `values` {tuple(values.shape)}", stderr)
    count, mu = v.shape[0], v.mean(dim=0) if v.shape[0] else v.sum(dim=0)
    m2 = ((v - mu) ** 2).sum(dim=0)
    sq = None if stderr is None else (stderr.detach().to(torch.float64) ** 2).sum(dim=0)
    if across_ranks:  # combine (count, mean, M2) of the ranks' shares in rank order
        comm = _Comm(group, timeout)
        stack = [torch.full_like(mu, count), mu, m2] + ([] if sq is None else [sq])
        parts = comm.gather(torch.stack(stack), everywhere=True)
        count, mu, m2 = 0, torch.zeros_like(mu), torch.zeros_like(m2)
        for p in parts:
            c = int(p[0].reshape(-1)[0])
            if c:
                delta, total = p[1] - mu, count + c
                mu = mu + delta * (c / total)
                m2 = m2 + p[2] + delta**2 * (count * c / total)
                count = total
        sq = None if sq is None else sum(p[3] for p in parts)
    check(count >= 1, "values", "at least one item")
    err = (m2 / (count - 1) / count).sqrt() if count > 1 else torch.full_like(mu, math.nan)
    noise = None if sq is None else sq.sqrt() / count
    return Estimate(mean=mu, stderr=err, noise_stderr=noise, n=count)


def bits_per_dim(ll, *, across_ranks: bool = False, group=None, timeout=None) -> Estimate:
    """Bits/dim of a (gathered) :class:`~difsolve.LogLikelihood` with standard errors.

    ``stderr`` is the spread over the data points (it includes the Hutchinson noise of each
    point), ``noise_stderr`` the Hutchinson part alone, ``ll.stderr / (d ln 2)`` combined over the
    points (NaN with one probe per point: one probe has no spread). ``across_ranks`` as in
    :func:`mean`.
    """
    d = ll.x[0].numel()
    return mean(ll.bits_per_dim, stderr=ll.stderr / (d * math.log(2.0)),
                across_ranks=across_ranks, group=group, timeout=timeout)
