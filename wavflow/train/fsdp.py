"""`training.strategy=fsdp`: PyTorch's own FSDP2 (`torch.distributed.fsdp.fully_shard`) over the
process group, one shard group per transformer block plus the root (TRAINING.md "Sharded training
(FSDP) and memory").

Everything is loaded first on the whole network (a resume, `training.init_from`, an initial
load: the same code as DDP, so any checkpoint starts any strategy at any world size); then
`shard_model` shards the network in place, `reshard_optimizer` rebuilds AdamW on the sharded
parameters with the loaded moments cut to each rank's shard, and `shard_shadows` cuts the EMA
copies alike (TrainState.shard_optimizer_and_emas). Checkpoints stay whole: the network's and
the EMAs' tensors (`full_tensor`) and the optimizer's (`full_optimizer_state_dict`) are gathered
on every rank (collectives: every rank calls them), rank 0 writes.

Outside the network's forward, FSDP2 leaves the root's parameters sharded; the training step
reads the learned empty tokens there (label drop, missing modalities), so it unshards the root
first (`unshard_root`).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard, FSDPModule, MixedPrecisionPolicy, register_fsdp_forward_method
from torch.distributed.tensor import distribute_tensor, DTensor

from wavflow.distributed import DistInfo
from wavflow.errors import ConfigError

STRATEGIES = ("ddp", "fsdp")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# methods sampling calls besides forward: FSDP2 gathers the parameters around them too
FORWARD_METHODS = ("preprocess_conditions", "predict_flow", "get_empty_conditions")


def check_strategy(tr: Any) -> str:
    strategy = str(tr.get("strategy", "ddp"))
    if strategy not in STRATEGIES:
        raise ConfigError(f"training.strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    if strategy == "fsdp" and bool(tr.get("compile", False)):
        raise ConfigError("training.compile=true with training.strategy=fsdp is not supported: set one of them")
    for key in ("param_dtype", "reduce_dtype"):
        value = (tr.get("fsdp") or {}).get(key)
        if value is not None and str(value) not in DTYPES:
            raise ConfigError(f"training.fsdp.{key} must be null or one of {list(DTYPES)}, got {value!r}")
    return strategy


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def shard_model(model: nn.Module, info: DistInfo, fsdp_cfg: Any) -> None:
    """fully_shard every transformer block and the loudness head, then the root (its own
    parameters: projections, embeddings, empty tokens, output layer), over all ranks."""
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    param, reduce = fsdp_cfg.get("param_dtype"), fsdp_cfg.get("reduce_dtype")
    policy = MixedPrecisionPolicy(param_dtype=DTYPES[str(param)] if param else None,
                                  reduce_dtype=DTYPES[str(reduce)] if reduce else None)
    reshard = bool(fsdp_cfg.get("reshard_after_forward", True))
    for block in [*model.joint_blocks, *model.fused_blocks]:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    head = getattr(model, "level_head", None)
    if head is not None:  # its own unit: it runs outside the network's forward, and FSDP must gather
        fully_shard(head, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)  # it again for backward
    # The feature statistics stay whole on every rank: frozen, a few KB, and their float64 tag
    # cannot share a gather buffer with float32 weights (FSDP2 crashed in backward with it).
    norm = getattr(model, "cond_norm", None)
    ignored = set(norm.parameters()) if norm is not None else None
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard, ignored_params=ignored)
    for name in FORWARD_METHODS:
        register_fsdp_forward_method(model, name)


def local_bytes(tensors: Iterable[Any]) -> int:
    """Bytes this rank holds of `tensors` (a shard's own part only); non-tensors count 0."""
    total = 0
    for t in tensors:
        if isinstance(t, torch.Tensor):
            t = t.to_local() if isinstance(t, DTensor) else t
            total += t.numel() * t.element_size()
    return total


def training_state_mb(model: nn.Module, optimizer: torch.optim.Optimizer, shadows: Iterable[torch.Tensor]) -> float:
    """What this rank holds per parameter: weights, gradients, AdamW moments and EMA copies (MB)."""
    params = list(model.parameters())
    moments = [v for st in optimizer.state.values() for v in st.values()
               if isinstance(v, torch.Tensor) and v.dim() > 0]
    return (local_bytes(params) + local_bytes(p.grad for p in params) + local_bytes(moments)
            + local_bytes(shadows)) / 2**20


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (a collective), or `t` itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`value`, a whole tensor of `param`'s shape, cut as `param` is (unchanged for a whole param)."""
    if not isinstance(param, DTensor) or tuple(value.shape) != tuple(param.shape):
        return value
    return distribute_tensor(value.to(param.device), param.device_mesh, param.placements)


def full_parameters(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for name, p in model.named_parameters():
        yield name, full_tensor(p.detach())


def full_optimizer_state_dict(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state dict in the plain layout (per parameter index, whole moments)."""
    state = optimizer.state_dict()
    whole = {i: {k: (full_tensor(v).to("cpu", copy=True) if isinstance(v, torch.Tensor) and v.dim() > 0 else v)
                 for k, v in s.items()} for i, s in sorted(state["state"].items())}
    return {"state": whole, "param_groups": state["param_groups"]}


def reshard_optimizer(old: torch.optim.Optimizer, build: Callable[[], torch.optim.Optimizer]) -> torch.optim.Optimizer:
    """A new optimizer over the (now sharded) parameters with `old`'s loaded state, each moment
    cut to its parameter's shard."""
    loaded = old.state_dict()
    new = build()
    if loaded["state"]:
        new.load_state_dict(loaded)
        for group in new.param_groups:
            for p in group["params"]:
                st = new.state.get(p, {})
                for k, v in list(st.items()):
                    if isinstance(v, torch.Tensor) and v.dim() > 0:
                        st[k] = shard_like(v, p)
    return new


def shard_shadows(shadow: list[torch.Tensor], model: nn.Module) -> list[torch.Tensor]:
    """EMA copies cut as the parameters they follow."""
    return [shard_like(e, p.detach()) for e, (_, p) in zip(shadow, model.named_parameters())]


def unshard_root(model: nn.Module) -> None:
    """Gather the root's parameters (the learned empty tokens among them) for use outside forward;
    FSDP2 reshards them after the backward."""
    if isinstance(model, FSDPModule):
        model.unshard()


def set_gradient_sync(model: nn.Module, sync: bool) -> None:
    """FSDP2's `no_sync`: reduce-scatter gradients only on the last micro-batch."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(sync)
