"""Many processes, on one machine or several, launched by ``torchrun`` (PyTorch's own launcher).

torchrun starts one process per device and tells each its place through the environment
(``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). :func:`setup`
joins the process group: gloo for the CPU, nccl for CUDA with this process on
``cuda:LOCAL_RANK``. Everything else here is the identity (or does nothing) in a single process,
so callers never branch on the number of processes.

What the package splits across processes, and what it does not:

* training: the task model (and committee members) under ``DistributedDataParallel``; each
  global batch of the one-process run is split across the processes (:func:`split_batches`);
* per-candidate scoring: each process scores a contiguous block of whole batches of candidates
  (:func:`shard_bounds`), and :func:`gather` puts the full score vector, in candidate order, on
  every process;
* evaluation: each process evaluates a block of the test set; the metric counts are merged;
* everything else (samplers, strategies that need every candidate at once) runs on every
  process with the same seeds, and rank 0's selection is broadcast (:func:`broadcast_object`);
* only rank 0 writes files (:func:`is_main`); :func:`on_rank0` runs a step there and gives its
  result, or its error, to every process.

A process that fails ends the run: it exits non-zero, and torchrun stops the others (a process
blocked in a collective with a dead peer gets an error from the backend first, with gloo). No
process writes a cycle's state before every process has done its part of that cycle, so the
state on disk is the last finished cycle's.
"""

from __future__ import annotations

import faulthandler
import os
import pickle
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .errors import ConfigError, GradnormALError

T = TypeVar("T")

#: fault injection for tests: ``RANK:STRATEGY:CYCLE`` makes that process raise in the middle of
#: that cycle (after training, before evaluation and selection)
FAIL_AT_ENV = "GRADNORM_AL_FAIL_AT"


# ------------------------------------------------------------------------------ who we are


def launched() -> bool:
    """Whether this process was started by torchrun (or any launcher that sets its variables)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_distributed() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the process group (0 without one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 in a single process)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Whether this process writes files, logs and prints (rank 0)."""
    return rank() == 0


def setup(device: torch.device) -> torch.device:
    """Join torchrun's process group (once; gloo on the CPU, nccl on CUDA) and return this
    process's device: ``cuda:LOCAL_RANK`` for a CUDA ``device``, else ``device``. Without torchrun
    nothing happens and ``device`` is returned."""
    if not launched():
        return device
    # a process killed by a fatal signal (a native abort) prints every thread's Python stack:
    # torchrun itself reports only the signal
    if not faulthandler.is_enabled():
        faulthandler.enable()
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ConfigError(
                f"process {os.environ['RANK']} has local rank {local} but this machine has "
                f"{torch.cuda.device_count()} CUDA device(s); start at most that many processes "
                "per node (torchrun --nproc_per_node)"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            dist.init_process_group(backend, device_id=device)
        else:
            dist.init_process_group(backend)
    return device


def shutdown(wait: bool = True) -> None:
    """Leave the process group, if this process joined one. ``wait``: after a barrier, so that
    no process tears its connections down while another still uses them (rank 0 writes the last
    files after the last collective). Without it (after an error: a peer may be gone or stuck)
    the group is destroyed at once; a process that exits still in the group can abort in its
    native teardown (the gloo threads outliving the interpreter)."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            try:
                dist.barrier()
            except Exception:  # noqa: BLE001 - a peer already gone: leave anyway
                pass
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - leaving after an error must not raise another
            if wait:
                raise


def exit_process(code: int) -> int:
    """End a process started by torchrun: flush stdout and stderr, then ``os._exit(code)``,
    skipping the interpreter's teardown. Call it after :func:`shutdown`. Returns ``code``
    (doing nothing) in a process torchrun did not start.

    Why: gloo's worker threads can release their last work items (and the tensors they hold,
    some owning Python objects) after the main thread has moved on; if that happens while the
    interpreter finalises, the thread cannot take the GIL, is made to exit inside a C++
    destructor and the process dies of ``std::terminate`` (SIGABRT, "terminate called without
    an active exception"; seen here in about 1 in 20 two-process resumes on a loaded 2-core
    machine, the core dump showing ``ProcessGroupGloo::runLoop`` destroying an
    ``AsyncBarrierWork``). Every file is written and closed before this point.
    """
    if not launched():
        return code
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: nothing more to say
            pass
    os._exit(code)


# ------------------------------------------------------------------------------ splitting work


def shard_bounds(
    n: int, granule: int, rank_: int | None = None, world: int | None = None
) -> tuple[int, int]:
    """``(start, stop)`` of process ``rank_``'s contiguous block of ``n`` items: whole runs of
    ``granule`` items (the scoring batch), as evenly as possible, in rank order. Scored in blocks
    of whole batches, every batch is one the single process would score, so the scores are the
    same bit for bit."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    granule = max(1, int(granule))
    batches = -(-n // granule)
    first, last = rank_ * batches // world, (rank_ + 1) * batches // world
    return min(n, first * granule), min(n, last * granule)


def check_batch_size(batch_size: int, world: int | None = None) -> None:
    """ConfigError unless the training batch splits evenly between the processes."""
    world = world_size() if world is None else world
    if batch_size % world:
        raise ConfigError(
            f"batch-size {batch_size} is not a multiple of the {world} processes; the global batch "
            f"is split evenly between them: use a multiple of {world}"
        )


def split_batches(
    n: int, batch_size: int, rank_: int | None = None, world: int | None = None
) -> tuple[np.ndarray, int, list[float | None]]:
    """How :func:`gradnorm_al.train.fit` splits a training epoch of ``n`` samples:
    ``(positions, per_process, factors)``.

    The epoch's shuffled order is cut into global batches of ``batch_size``, those of the single
    process; process r takes the positions ``r, r + W, r + 2W, ...`` of every global batch, which
    is ``order[positions]`` read in local batches of ``per_process = batch_size / W`` (how
    torch's DistributedSampler strides, applied to the one-process order). ``factors[i]`` is what
    this process's mean loss on global batch i is multiplied by so that the average over the
    processes is the batch's mean (its share x W / the batch size: 1 but for a short last batch),
    or None where the batch is skipped: unless every process gets at least two of its samples
    (BatchNorm cannot train on one; with W = 1: the batch holds at least two)."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    check_batch_size(batch_size, world)
    factors: list[float | None] = []
    for start in range(0, n, batch_size):
        size = min(batch_size, n - start)
        share = len(range(rank_, size, world))
        factors.append(share * world / size if size // world >= 2 else None)
    return np.arange(rank_, n, world, dtype=np.int64), batch_size // world, factors


# ------------------------------------------------------------------------------ collectives


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """Process ``src``'s ``obj`` (picklable) on every process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


def all_true(*flags: bool | torch.Tensor) -> tuple[bool, ...]:
    """Each flag and-ed over every process (one small collective for all of them)."""
    values = torch.tensor([bool(f) for f in flags], dtype=torch.int32)
    if is_distributed():
        values = values.to(_comm_device())
        dist.all_reduce(values, op=dist.ReduceOp.MIN)
    return tuple(bool(v) for v in values.tolist())


def gather(local: torch.Tensor | np.ndarray) -> Any:
    """Every process's ``local`` rows ``[n_r, ...]`` (same dtype and trailing shape; ``n_r`` may
    differ, 0 included) concatenated in rank order, on every process, on the CPU, as the type
    given (a tensor or an array)."""
    if not is_distributed():
        return local
    as_array = isinstance(local, np.ndarray)
    tensor = torch.from_numpy(np.ascontiguousarray(local)) if as_array else local.detach()
    comm = _comm_device()
    count = torch.tensor([len(tensor)], dtype=torch.int64, device=comm)
    counts = [torch.zeros_like(count) for _ in range(world_size())]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    padded = torch.zeros((max(sizes), *tensor.shape[1:]), dtype=tensor.dtype, device=comm)
    padded[: len(tensor)] = tensor.to(comm)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    full = torch.cat([part[:size] for part, size in zip(parts, sizes)]).cpu()
    return full.numpy() if as_array else full


def gather_objects(obj: T) -> list[T]:
    """Every process's ``obj`` (picklable), in rank order, on every process."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel (rank 0's weights and buffers are broadcast to
    every process first), or ``model`` itself in a single process."""
    if not is_distributed():
        return model
    ids = [device] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def average_gradients(params: Sequence[torch.Tensor]) -> None:
    """Average the ``.grad`` of ``params`` over the processes, in place: for parameters trained
    outside DistributedDataParallel (a strategy's auxiliary module). A gradient that is None on
    every process stays None (the optimizer skips that parameter, as in one process)."""
    if not is_distributed() or not params:
        return
    comm = _comm_device()
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=comm)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    live = [p for p, h in zip(params, has.tolist()) if h]
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if not live:
        return
    flat = torch.cat([p.grad.reshape(-1).to(comm, torch.float64) for p in live])
    dist.all_reduce(flat)
    flat /= world_size()
    start = 0
    for p in live:
        size = p.grad.numel()
        p.grad.copy_(flat[start : start + size].view_as(p.grad))
        start += size


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Make every process's ``module`` (parameters and buffers) a copy of process ``src``'s.

    After training under DistributedDataParallel the weights agree, but each process's BatchNorm
    running statistics were last updated with its own share of the batch: rank 0's are kept."""
    if not is_distributed():
        return
    comm = _comm_device()
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            data = t.detach().to(comm).contiguous()
            dist.broadcast(data, src=src)
            if data.data_ptr() != t.data_ptr():
                t.copy_(data)


# ------------------------------------------------------------------------------ rank 0 and errors


def on_rank0(fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0 alone; its result (picklable) on every process, or the
    :class:`~gradnorm_al.errors.GradnormALError` it raised, raised on every process (so that all
    of them stop with rank 0's one-line message). Any other exception stops rank 0, and torchrun
    the others."""
    if not is_distributed():
        return fn()
    result: Any = None
    error: GradnormALError | None = None
    if rank() == 0:
        try:
            result = fn()
        except GradnormALError as err:
            error = err if _picklable(err) else GradnormALError(str(err))
    result, error = broadcast_object((result, error))
    if error is not None:
        if rank() != 0:
            error.reported_by_rank0 = True  # type: ignore[attr-defined]
        raise error
    return result


def _picklable(err: Exception) -> bool:
    try:
        pickle.loads(pickle.dumps(err))
    except Exception:
        return False
    return True


def reports(err: BaseException) -> bool:
    """Whether this process prints ``err``: a single process does; under torchrun, rank 0
    prints the errors every process has (a refused option, an error :func:`on_rank0` shared)
    and every process prints its own."""
    if not launched() or os.environ["RANK"] == "0":
        return True
    return not (getattr(err, "reported_by_rank0", False) or isinstance(err, ConfigError))


def label(message: str) -> str:
    """``message`` prefixed with this process's rank under torchrun."""
    if not launched():
        return message
    return f"[rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']}] {message}"


#: what the backends say when a peer process went away (gloo; nccl raises DistError)
_LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def lost_peer(err: BaseException) -> bool:
    """Whether ``err`` says that another process went away (it failed, or was stopped)."""
    backend_error = getattr(dist, "DistError", ())  # absent from builds without distributed
    return isinstance(err, backend_error) or any(m in str(err) for m in _LOST_PEER)


def failure_message(err: BaseException) -> str:
    """The one line a process prints when an unexpected error stops it under torchrun."""
    what = f"{type(err).__name__}: {err}"
    if lost_peer(err):
        cause = f"lost contact with another process ({what}): it failed first, see its error"
    else:
        cause = f"this process failed ({what})"
    return label(
        f"{cause}; the run stops, torchrun ends the other processes. The run folder keeps the "
        "state of the last finished cycle: continue it with `gradnorm-al run --resume DIR` "
        "under the same torchrun command"
    )


def fault_point(strategy: str, cycle: int) -> None:
    """Raise here if :data:`FAIL_AT_ENV` names this process, ``strategy`` and ``cycle`` (tests)."""
    spec = os.environ.get(FAIL_AT_ENV)
    if not spec:
        return
    want_rank, want_strategy, want_cycle = spec.split(":")
    if (int(want_rank), want_strategy, int(want_cycle)) == (rank(), strategy, cycle):
        raise RuntimeError(f"fault injected by {FAIL_AT_ENV}={spec}")
