"""Distributed plumbing: process-group init from any launcher, rank helpers, collectives that work on CPU and GPU.

Launchers understood (first match wins):
  * ``torchrun`` / ``python -m torch.distributed.run``: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (+ MASTER_ADDR/PORT);
  * legacy ``python -m torch.distributed.launch``: the same variables plus a ``--local-rank=N`` argument;
  * ``--dist_on_itp``: OpenMPI's ``OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK}`` with ``MASTER_ADDR``/``MASTER_PORT``;
  * SLURM ``srun``: ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID`` (MASTER_ADDR/PORT must be exported);
  * otherwise a single, non-distributed process.

The backend follows the device: ``nccl`` for CUDA, ``gloo`` for CPU.
"""
import argparse
import datetime
import os
from typing import Any, List, Optional

import torch
import torch.distributed as dist

from util.errors import UserError


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    """Flags shared by all scripts (MAE names, both spellings of the legacy launcher's local-rank flag)."""
    from util.args import integer  # (util.args imports this module)
    g = parser.add_argument_group('distributed')
    g.add_argument('--world_size', default=1, type=int,
                   help='number of processes; informational: the real value comes from the launcher '
                        '(torchrun/SLURM), and a mismatch is reported (default: 1)',
                   domain=integer(1), defines_run=True)
    g.add_argument('--local_rank', '--local-rank', dest='local_rank', type=int,
                   default=int(os.environ.get('LOCAL_RANK', -1)),
                   help='set by `python -m torch.distributed.launch`; torchrun uses $LOCAL_RANK instead',
                   domain=integer(-1))
    g.add_argument('--dist_on_itp', action='store_true',
                   help='read ranks from OpenMPI variables (OMPI_COMM_WORLD_*)')
    g.add_argument('--dist_url', default='env://',
                   help='process-group init URL (default: env://, i.e. MASTER_ADDR/MASTER_PORT)')
    g.add_argument('--dist_backend', default='auto', choices=['auto', 'nccl', 'gloo'],
                   help='collective backend; auto = nccl on CUDA, gloo on CPU (default: auto)')


def _env_ranks(args: argparse.Namespace) -> Optional[tuple]:
    env = os.environ
    if getattr(args, 'dist_on_itp', False):
        try:
            r, w, lr = (int(env['OMPI_COMM_WORLD_RANK']), int(env['OMPI_COMM_WORLD_SIZE']),
                        int(env['OMPI_COMM_WORLD_LOCAL_RANK']))
        except KeyError as e:
            raise UserError(f'--dist_on_itp: OpenMPI variable {e.args[0]} is not set; launch with mpirun') from None
        env['RANK'], env['WORLD_SIZE'], env['LOCAL_RANK'] = str(r), str(w), str(lr)
        return r, w, lr
    if 'RANK' in env and 'WORLD_SIZE' in env:
        return int(env['RANK']), int(env['WORLD_SIZE']), int(env.get('LOCAL_RANK', 0))
    if 'SLURM_PROCID' in env and int(env.get('SLURM_NTASKS', '1')) > 1:
        r, w = int(env['SLURM_PROCID']), int(env['SLURM_NTASKS'])
        lr = int(env.get('SLURM_LOCALID', r % max(1, torch.cuda.device_count())))
        env['RANK'], env['WORLD_SIZE'], env['LOCAL_RANK'] = str(r), str(w), str(lr)
        return r, w, lr
    return None


def init_distributed_mode(args: argparse.Namespace) -> torch.device:
    """Initialise the process group (if launched distributed) and return this process's device.

    Sets ``args.rank``, ``args.world_size``, ``args.gpu`` (local rank), ``args.distributed``. The requested
    ``--device`` decides the backend; a CUDA request on a machine without CUDA is a UserError.
    """
    requested = getattr(args, 'device', 'cuda')
    if requested.startswith('cuda') and not torch.cuda.is_available():
        raise UserError(f'--device {requested}: CUDA is not available on this machine; pass --device cpu')
    ranks = _env_ranks(args)
    claimed = getattr(args, 'world_size', 1)
    if ranks is None:
        args.rank, args.world_size, args.gpu, args.distributed = 0, 1, 0, False
        if claimed not in (None, 1):
            print(f'warning: --world_size {claimed} given but no launcher environment found; running 1 process')
        return torch.device(requested)
    rank, world, local = ranks
    if claimed not in (None, 1, world):
        print(f'warning: --world_size {claimed} disagrees with the launcher ({world} processes); using {world}')
    args.rank, args.world_size, args.gpu, args.distributed = rank, world, local, True
    if requested.startswith('cuda'):
        # srun with one GPU bound per task shows each task a single device whatever its local rank
        index = local if local < torch.cuda.device_count() else local % torch.cuda.device_count()
        torch.cuda.set_device(index)
        device = torch.device('cuda', index)
    else:
        device = torch.device(requested)
    backend = args.dist_backend if getattr(args, 'dist_backend', 'auto') != 'auto' else (
        'nccl' if device.type == 'cuda' else 'gloo')
    dist.init_process_group(backend=backend, init_method=args.dist_url, world_size=world, rank=rank,
                            timeout=datetime.timedelta(minutes=int(os.environ.get('VITFREEZE_DIST_TIMEOUT_MIN', 30))))
    dist.barrier()
    print(f'| distributed init (rank {rank}/{world}, local {local}, backend {backend}): {args.dist_url}', flush=True)
    return device


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def print0(*a, **kw) -> None:
    """print() on rank 0 only (other ranks stay quiet unless ``force=True``)."""
    force = kw.pop('force', False)
    if force or is_main_process():
        print(*a, **kw, flush=True)


def seed_process(seed: int) -> None:
    """Seed torch, numpy and ``random`` with ``seed + rank`` (each rank its own stream, reproducible per --seed)."""
    import random

    import numpy as np
    s = seed + get_rank()
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_mean(x: float, device: Optional[torch.device] = None) -> float:
    """Mean of a Python number over ranks (identity when not distributed)."""
    if not is_dist():
        return float(x)
    t = torch.tensor(float(x), dtype=torch.float64, device=device or _collective_device())
    dist.all_reduce(t)
    return t.item() / get_world_size()


def all_reduce_tensor(t: torch.Tensor, op=None) -> torch.Tensor:
    """In-place all-reduce (sum by default) of a tensor on the backend's device; returns it."""
    if is_dist():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def broadcast_from_rank0(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's copy of ``t`` on every rank (a new tensor on ``t``'s device); identity when not distributed."""
    if not is_dist():
        return t
    buf = t.detach().to(_collective_device()).contiguous()
    dist.broadcast(buf, src=0)
    return buf.to(t.device)


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor's dim 0 from all ranks (sizes may differ per rank)."""
    if not is_dist():
        return t
    world = get_world_size()
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    pad = max(sizes) - t.shape[0]
    padded = torch.cat([t, t.new_zeros((pad,) + tuple(t.shape[1:]))]) if pad else t
    out: List[torch.Tensor] = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded.contiguous())
    return torch.cat([o[:s] for o, s in zip(out, sizes)])


def gather_to_rank0(obj: Any) -> Optional[List[Any]]:
    """Every rank's picklable ``obj`` on rank 0 (index = rank), None elsewhere; ``[obj]`` when not distributed.
    A collective: every rank must call it."""
    if not is_dist():
        return [obj]
    out: Optional[List[Any]] = [None] * get_world_size() if is_main_process() else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_gather_objects(obj: Any) -> List[Any]:
    """Every rank's picklable ``obj`` on every rank (index = rank); ``[obj]`` when not distributed."""
    if not is_dist():
        return [obj]
    out: List[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _collective_device() -> torch.device:
    if is_dist() and dist.get_backend() == 'nccl':
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def collective_device() -> torch.device:
    """Device on which tensors must live for collectives of the current backend."""
    return _collective_device()


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()
