"""Data-parallel training under ``torchrun``: process group, model wrapping, rank-aware I/O.

The training command is the same with one process or many::

    moelab train configs/small.yaml --out runs/small                      # one process
    torchrun --nproc_per_node 2 -m moelab train configs/small.yaml --out runs/small   # 2 ranks, CPU (gloo)

Each rank reads its disjoint ``micro_batch_size * grad_accum_steps`` rows of every global batch
(:class:`moelab.data.TokenLoader` with ``rank`` / ``world_size``), gradients are averaged across ranks
(DDP all-reduce, or FSDP2 ``fully_shard`` reduce-scatter with ``train.distributed: fsdp``), and rank 0
alone writes metrics, TensorBoard, checkpoints and the progress bar. A global batch of
``micro_batch_size * grad_accum_steps * world_size`` sequences gives the same loss curve as one process
with ``grad_accum_steps * world_size`` accumulation steps (up to floating-point reduction order).

GPU nodes (NCCL is chosen automatically when CUDA is available; ``train.device: auto``)::

    # one node, 8 GPUs
    torchrun --standalone --nproc_per_node 8 -m moelab train configs/study-d512.yaml --out /ckpt/d512-e8k2
    # several nodes: run on every node (same --out on a shared filesystem; rank 0 writes it)
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST0:29500 \\
        --rdzv_id d512-e8k2 -m moelab train configs/study-d512.yaml --out /shared/ckpt/d512-e8k2

Choose ``micro_batch_size`` to fit memory and ``grad_accum_steps`` so that the global batch matches the
recipe (the study: 1 024 sequences of 4 096 tokens). Re-running the same command resumes from the
newest complete checkpoint, also with a different number of ranks as long as the global batch is equal.
Use ``train.distributed: fsdp`` when the model plus AdamW state does not fit one GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Dist:
    """This process's place in the job (``world_size == 1`` without torchrun)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device_type: str) -> Dist:
    """Join the process group if launched by torchrun (``WORLD_SIZE > 1``); gloo on CPU, nccl on CUDA.

    On CPU each rank gets ``cores // local_world_size`` intra-op threads so ranks do not oversubscribe.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    else:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return Dist(rank=rank, local_rank=local_rank, world_size=world)


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum of ``t`` over ranks (in place; returns ``t``)."""
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def wrap(model: nn.Module, strategy: str, d: Dist, device: torch.device) -> nn.Module:
    """DDP or FSDP2 (``fully_shard`` per block, then the root) when distributed; ``model`` otherwise."""
    if not d.enabled:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:  # type: ignore[attr-defined]
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def no_sync(model: nn.Module, last_micro_step: bool):
    """Skip the gradient all-reduce on all but the last micro step of an accumulation."""
    from contextlib import nullcontext

    if last_micro_step:
        return nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)

        class _Restore:
            def __enter__(self):
                return None

            def __exit__(self, *exc):
                model.set_requires_gradient_sync(True)
                return False

        return _Restore()
    return nullcontext()


# ------------------------------------------------------------------ full (unsharded) state dicts
# Parameters are named as in ``MoELM.named_parameters()`` (wrapper prefixes stripped, tied weights once);
# FSDP2 parameters are DTensors and are gathered with ``full_tensor()`` (a collective: call on every rank).
def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu()


def _like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``value`` (a full CPU tensor) placed like ``param``: same device, sharded the same way under FSDP."""
    if hasattr(param, "device_mesh") and value.shape == param.shape:
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.to(param.device_mesh.device_type), param.device_mesh, param.placements)
    return value.to(param.device)


def named_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters by clean name; FSDP modules are resharded first (a forward without backward, e.g.
    evaluation, leaves the root's parameters unsharded, and those are not the optimizer's tensors)."""
    from .optim import _clean

    for m in model.modules():
        if hasattr(m, "reshard") and hasattr(m, "set_requires_gradient_sync"):
            m.reshard()
    return {_clean(name): p for name, p in model.named_parameters()}


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded parameter tensors on CPU keyed by ``MoELM`` names."""
    return {name: _full(p) for name, p in named_params(model).items()}


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Unsharded optimizer ``state_dict`` whose parameters are named (not numbered)."""
    name_of = {id(p): name for name, p in named_params(model).items()}
    state = {name_of[id(p)]: {k: _full(v) if isinstance(v, torch.Tensor) else v for k, v in st.items()}
             for p, st in optimizer.state.items()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [name_of[id(p)] for p in g["params"]]}
              for g in optimizer.param_groups]
    return {"state": state, "param_groups": groups}


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, torch.Tensor], optim_state: dict[str, Any]) -> None:
    """Load unsharded states from :func:`full_model_state` / :func:`full_optimizer_state` (every rank)."""
    from ..errors import CheckpointError

    params = named_params(model)
    if set(params) != set(model_state):
        raise CheckpointError(f"checkpoint tensors {sorted(set(model_state) ^ set(params))[:3]} do not match the model; resume with the same model config")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(_like(model_state[name].to(p.dtype), p))
    saved_groups = optim_state["param_groups"]
    if [g["params"] for g in saved_groups] != [[n for n in g["names"]] for g in optimizer.param_groups]:
        raise CheckpointError("optimizer state does not match the model's parameter groups; resume with the same model config")
    for group, saved in zip(optimizer.param_groups, saved_groups):
        group.update({k: v for k, v in saved.items() if k not in ("params", "names")})
    optimizer.state.clear()
    for name, st in optim_state["state"].items():
        p = params[name]
        optimizer.state[p] = {k: (v if k == "step" else _like(v.to(p.dtype), p)) if isinstance(v, torch.Tensor) else v
                              for k, v in st.items()}
