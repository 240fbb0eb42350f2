"""FSDP2: the transformer sharded over the processes block by block, with PyTorch's ``fully_shard``.

The trainer shards a copy of the user's transformer, never the user's own module: ``fully_shard`` changes a
module's class and turns its parameters into DTensors, and the pipeline is handed back as it was found. The copy
is built on the meta device (its structure, LoRA layers, flags and attention processors copied; no weight
duplicated), sharded, and each process fills its local shards from the user's weights. Trained weights go back
into the user's module one parameter at a time (``full_tensor`` is a collective), so that the usual writers (the
pipeline's ``save_lora_weights``, ``save_pretrained``) write whole files. The optimizer state stays sharded: a
checkpoint holds it as a torch distributed checkpoint, each process writing its own shards.

The code is the same on CPU (gloo) and GPU (nccl). accelerate's own FSDP plugin is not used: on a CPU it is
ignored (accelerate runs ``MULTI_CPU``, unsharded), so an accelerate FSDP config is read here instead
(:func:`fsdp_requested_by_accelerate`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os

import torch

__all__ = [
    "fsdp_requested_by_accelerate",
    "with_accelerate_fsdp",
    "gather_into",
    "load_optimizer",
    "save_optimizer",
    "scatter_from",
    "shard_copy",
    "sharded_clip_grad_norm_",
]

# accelerate launch passes its FSDP config as these environment variables.
_USE_FSDP = "ACCELERATE_USE_FSDP"
_FSDP_VERSION = "FSDP_VERSION"
_OFFLOAD = "FSDP_OFFLOAD_PARAMS"
_RESHARD = "FSDP_RESHARD_AFTER_FORWARD"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def fsdp_requested_by_accelerate() -> bool:
    """Whether ``accelerate launch`` was given an FSDP config; one clear error for a setting this trainer cannot
    honour. FSDP version 2 maps onto the trainer's own sharding (per block, ``reshard_after_forward``, the mixed
    precision of the run); version 1 and CPU offload are refused."""
    if not _env_flag(_USE_FSDP):
        return False
    version = os.environ.get(_FSDP_VERSION, "1").strip()
    if version != "2":
        raise ValueError(
            f"the accelerate config asks for FSDP version {version}; diffusers-srpo shards with FSDP2 (fully_shard): "
            "set fsdp_version: 2 in the accelerate config (examples/accelerate/fsdp.yaml)"
        )
    if _env_flag(_OFFLOAD):
        raise ValueError("the accelerate config asks for fsdp_offload_params: true; diffusers-srpo's FSDP keeps the "
                         "shards on the GPU: set it to false")  # fmt: skip
    reshard = os.environ.get(_RESHARD, "true").strip().lower()
    if reshard not in ("true", "1"):
        raise ValueError(
            f"the accelerate config asks for fsdp_reshard_after_forward: {reshard}; diffusers-srpo's FSDP reshards "
            "after forward (FULL_SHARD): set it to true"
        )
    return True


def with_accelerate_fsdp(config):
    """``config`` with ``fsdp`` on where ``accelerate launch`` was given an FSDP2 config (see
    :func:`fsdp_requested_by_accelerate`); checked before a checkpoint is resolved, which keeps the setting."""
    if fsdp_requested_by_accelerate() and not config.fsdp:
        return dataclasses.replace(config, fsdp=True)
    return config


@contextlib.contextmanager
def accelerate_without_fsdp():
    """Build the ``Accelerator`` as a plain multi-process one: the trainer shards by itself (see the module doc)."""
    saved = os.environ.pop(_USE_FSDP, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[_USE_FSDP] = saved


def block_classes(transformer: torch.nn.Module) -> tuple[type, ...]:
    """The transformer's block classes: those its ``_no_split_modules`` names (FLUX's two kinds, SD3's, ...)."""
    names = set(getattr(transformer, "_no_split_modules", None) or ())
    classes = tuple({type(m) for m in transformer.modules() if type(m).__name__ in names})
    if not classes:
        raise ValueError(
            f"{type(transformer).__name__} names no block class in _no_split_modules ({sorted(names)}): FSDP "
            "cannot shard it per block"
        )
    return classes


def shard_copy(
    transformer: torch.nn.Module, device: torch.device, param_dtype: torch.dtype | None
) -> torch.nn.Module:
    """A copy of ``transformer`` sharded over every process: ``fully_shard`` on each block, then on the root.

    Compute runs in ``param_dtype`` (``None``: the weights' own), gradients are reduced in float32. Each
    process's shards are filled from ``transformer``'s weights, which stay where they are; requires_grad is kept.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    blocks = block_classes(transformer)
    # deepcopy with every tensor mapped to an empty meta twin: the structure is copied, no weight is.
    memo = {}
    for tensor in [*transformer.parameters(), *transformer.buffers()]:
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = torch.nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, torch.nn.Parameter) else meta
    sharded = copy.deepcopy(transformer, memo)

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for module in sharded.modules():
        if isinstance(module, blocks):
            fully_shard(module, mesh=mesh, mp_policy=policy)
    fully_shard(sharded, mesh=mesh, mp_policy=policy)
    sharded.to_empty(device=device)
    scatter_from(transformer, sharded, trainable_only=False)
    return sharded


@torch.no_grad()
def scatter_from(whole: torch.nn.Module, sharded: torch.nn.Module, trainable_only: bool = True) -> None:
    """Fill ``sharded``'s local shards (and buffers) from the whole module ``whole``, on every process; no
    communication: each process cuts its own shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    sources = dict(whole.named_parameters())
    for name, parameter in sharded.named_parameters():
        if trainable_only and not parameter.requires_grad:
            continue
        source = sources[name].detach().to(parameter.device, parameter.dtype)
        if isinstance(parameter, DTensor):
            local = distribute_tensor(source, parameter.device_mesh, parameter.placements, src_data_rank=None)
            parameter.to_local().copy_(local.to_local())
        else:
            parameter.copy_(source)
    if not trainable_only:
        buffers = dict(whole.named_buffers())
        for name, buffer in sharded.named_buffers():
            buffer.copy_(buffers[name].to(buffer.device, buffer.dtype))


@torch.no_grad()
def gather_into(sharded: torch.nn.Module, whole: torch.nn.Module) -> None:
    """Copy the trained (requires_grad) parameters of ``sharded`` into ``whole``, one at a time: a collective, every
    process calls it, and every process's ``whole`` ends up with the same trained weights."""
    from torch.distributed.tensor import DTensor

    targets = dict(whole.named_parameters())
    for name, parameter in sharded.named_parameters():
        if not parameter.requires_grad:
            continue
        full = parameter.full_tensor() if isinstance(parameter, DTensor) else parameter
        targets[name].copy_(full.to(targets[name].device, targets[name].dtype))


def sharded_clip_grad_norm_(parameters: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` over sharded parameters: the norm of the whole gradient, the same on every process."""
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def save_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: str) -> None:
    """The sharded optimizer state as a torch distributed checkpoint: every process writes its own shards."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=directory)


def load_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: str) -> None:
    """Read what :func:`save_optimizer` wrote into ``optimizer`` (same number of processes)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=directory)
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
