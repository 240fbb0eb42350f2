"""Memory and FLOPs of one training update at any model size, without the memory: the trainer's own update, run on
fake tensors.

Build the pipeline and the reward inside :func:`simulated_tensors`, the trainer with :func:`simulated_trainer`, then
:func:`simulate_update` runs one update of the trainer (its ``training_step``, the backward passes and the optimizer
step: the code path of ``train()``) under a memory tracker (:class:`LiveBytes`) and a FLOP counter
(:class:`UpdateFlopCounter`). A fake tensor has a shape, a dtype and a device but no data, so a 12B model costs no
memory and an update takes seconds of Python.

Two things make the trainer run unchanged on fake tensors:

- Tensors that no weight has touched are computed for real: random draws, schedules, indices, position ids
  (anything built from real inputs alone and, during the update, a factory of at most ``REAL_NUMEL_LIMIT``
  elements). Control flow that depends on them (the sampled timestep, its range check) is then that of a real
  run.
- A value read from a tensor that a weight has touched (``loss.item()``, ``bool(x.all())``) has no value to
  read: it is ``0.5`` for a float, ``True`` for a bool and ``0`` for an integer. Such reads only feed the logs
  and the non-finite check (which then passes) on the update path, so the simulated update is a normal one.

What the numbers are: the peak is the largest sum of the tensors alive at once on the device (the weights, the
LoRA or full-model training state, activations, temporaries), as the CUDA caching allocator's
``max_memory_allocated`` counts it but without its rounding to 512-byte blocks, and without the CUDA context,
cuBLAS workspaces or fragmentation. Autocast follows the CPU's policy (CUDA autocast cannot run without a GPU),
which keeps a few normalisations in bf16 that CUDA would run in fp32. FLOPs count matrix products, convolutions
and attention (torch's FLOP formulas), recomputation under activation checkpointing included.

Sharded updates (FSDP2): inside :func:`simulated_process_group`, this process is rank 0 of ``N`` processes whose
collectives do nothing (torch's fake process group), so that a trainer with ``fsdp=True`` really shards its
transformer (``fully_shard``: each parameter a DTensor holding this rank's shard) and :func:`simulate_update` counts
what one GPU holds: the local shards of the weights, gradients and optimizer state, FSDP's unsharded parameters
while a block runs (``"unsharded weights"``) and its all-gather and reduce-scatter buffers (``"fsdp comm buffers"``).
The collectives' own buffers (NCCL's, outside the caching allocator) are not counted, and neither is anything of
the other ranks.

A frozen base quantized for a small card (``diffusers_srpo.quantization``: bitsandbytes NF4, torchao int8 or float8
weight-only) cannot be quantized on fake tensors (bitsandbytes' and torchao's kernels need data), so
:func:`simulated_quantization` replaces each linear layer where ``quantize_in_memory`` would quantize it with a
:class:`SimulatedQuantizedLinear`: fake tensors of the real format's exact layout (its bytes are checked against a
really quantized model in the tests) and a forward that runs the backend's own sequence of ops on them, the
dequantized weight included (``"dequantized weights"``: a transient in bitsandbytes' forward and backward; in
torchao's, what autograd keeps for the backward). bitsandbytes' 8-bit AdamW needs no model: the trainer's own
optimizer runs on the fake gradients, and its state is bitsandbytes' own.

FLOPs are counted by :class:`UpdateFlopCounter`, torch's ``FlopCounterMode`` without its per-module attribution:
that attribution's ``ModuleTracker`` registers gradient hooks on the tensors of every module call, the calls that
activation checkpointing recomputes during backward included, and those hooks never fire and keep the recomputed
activations alive until the counter exits (pytorch/pytorch#139214). Under the whole update that made a checkpointed
peak larger than an unchecked one, on real tensors as on fake ones.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import TreeSpec, tree_flatten, tree_leaves, tree_unflatten
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

__all__ = ["REAL_NUMEL_LIMIT", "LiveBytes", "RepeatedCallReplay", "SimulatedQuantizedLinear", "UpdateCost", "UpdateFlopCounter", "base_parameter_count", "prepare_steady_update", "simulate_update", "simulated_process_group", "simulated_quantization", "simulated_tensors", "simulated_trainer"]

#: Factories of at most this many elements run for real inside :func:`simulated_tensors` (noise, ids, schedules).
REAL_NUMEL_LIMIT = 2**24
_aten = torch.ops.aten

# Where torch.distributed builds a device mesh's tensor of ranks (see _RealWhereNoWeightTouched).
_DEVICE_MESH_MODULES = ("torch.distributed.device_mesh", "torch.distributed._mesh_layout")
_FSDP_COLLECTIVES = "torch.distributed.fsdp._fully_shard._fsdp_collectives"
_FSDP_PARAM = "torch.distributed.fsdp._fully_shard._fsdp_param"


def _dtensor_class() -> type | None:
    """DTensor's class, once ``torch.distributed.tensor`` is imported (no DTensor exists before); else ``None``."""
    module = sys.modules.get("torch.distributed.tensor._api")
    return None if module is None else module.DTensor


def _has_dtensor(types) -> bool:
    """Whether a DTensor is among the tensor types of a dispatched op."""
    dtensor = _dtensor_class()
    return dtensor is not None and any(issubclass(t, dtensor) for t in types)


def _local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard, the tensor this process holds (its own storage is a wrapper of the global size, which
    no device holds); any other tensor itself."""
    dtensor = _dtensor_class()
    return tensor._local_tensor if dtensor is not None and isinstance(tensor, dtensor) else tensor


def _distributed_caller(frame) -> tuple[str, str] | None:
    """Module and function of the ``torch.distributed`` code that called the op being dispatched, or ``None`` where
    the op comes from elsewhere (a model, the trainer, accelerate).

    ``frame`` is the ``__torch_dispatch__`` asking. The caller is the nearest frame above it that is neither a
    mode's ``__torch_dispatch__`` nor torch's own plumbing (``torch.*`` outside ``torch.distributed``: op overloads,
    decompositions, ``nn.functional``, autograd, checkpointing), so that a model's op under checkpointing or
    autograd is the model's, and FSDP's or DTensor's own ops are theirs. The function is the nearest one with a name
    (a comprehension is a frame of its own before Python 3.12).
    """
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.startswith("torch.distributed."):
            while frame.f_code.co_name.startswith("<") and frame.f_back is not None and frame.f_back.f_globals is frame.f_globals:
                frame = frame.f_back
            return module, frame.f_code.co_name
        if frame.f_code.co_name != "__torch_dispatch__" and module != "torch" and not module.startswith("torch."):
            return None
        frame = frame.f_back
    return None


class _RealWhereNoWeightTouched(TorchDispatchMode):
    """Above a ``FakeTensorMode``: ops of real tensors only run for real; fake scalar reads get a stand-in value;
    small factories run for real while ``real_factories`` (during the update, never while models are built: their
    weights start as factories too).

    Under a (fake) process group: a DTensor op is left to DTensor, whose ops on the local shards then come through
    here; a factory called by ``torch.distributed`` stays fake whatever its size (FSDP's all-gather and reduce-scatter
    buffers and unsharded parameters, DTensor's global-shape propagation tensors: weights and gradients, not noise),
    except a device mesh's tensor of ranks, which is always real."""

    real_factories = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _has_dtensor(types):
            # A DTensor is no FakeTensor: below, its op would pass for one of real tensors and run with fake mode
            # unset. DTensor turns it into the ops of the local shards (fake tensors), which come back through here.
            return NotImplemented
        tensors = [x for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        if any(isinstance(x, FakeTensor) for x in tensors):
            if func is _aten._local_scalar_dense.default:
                dtype = args[0].dtype
                return True if dtype == torch.bool else 0.5 if dtype.is_floating_point else 0
            return func(*args, **kwargs)
        if tensors:
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        # A factory. A device mesh finds this rank's coordinates in its tensor of ranks with nonzero(), which a fake
        # tensor cannot answer (init_device_mesh inside fake mode fails with DynamicOutputShapeException): the mesh's
        # own factories (world-size integers) run for real, always. Any other factory of torch.distributed stays fake.
        caller = _distributed_caller(sys._getframe())
        if caller is not None and caller[0].startswith(_DEVICE_MESH_MODULES):
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        # Its fake result tells the size before anything is allocated.
        fake = func(*args, **kwargs)
        if self.real_factories and caller is None and all(x.numel() <= REAL_NUMEL_LIMIT for x in tree_leaves(fake) if isinstance(x, torch.Tensor)):
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        return fake


@contextlib.contextmanager
def _fake_parameters_convertible(fake_mode: FakeTensorMode) -> Iterator[None]:
    """Let ``module.to(...)`` convert fake parameters.

    ``Module._apply`` swaps a fake parameter with its converted self (``torch.utils.swap_tensors``), which refuses a
    tensor that has a weak reference, and the fake mode's memo holds one to every fake tensor (pytorch/pytorch#170781,
    fixed upstream after the torch this project pins). As the upstream fix does, the two tensors leave the memo
    just before they are swapped; the memo only caches conversions, so nothing else changes.
    """
    swap_tensors = torch.utils.swap_tensors
    memo = fake_mode.fake_tensor_converter.tensor_memo

    def swap_without_memo(t1, t2):
        for key in [key for key, value in list(memo.items()) if value is t1 or value is t2]:
            del memo[key]
        return swap_tensors(t1, t2)

    torch.utils.swap_tensors = swap_without_memo
    try:
        yield
    finally:
        torch.utils.swap_tensors = swap_tensors


@contextlib.contextmanager
def simulated_tensors() -> Iterator[FakeTensorMode]:
    """Inside, tensors are fake (no data, no memory) except those no weight has touched (see the module docstring).

    Build the models, the reward and the trainer in here and call :func:`simulate_update` in here too.
    """
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode, _fake_parameters_convertible(fake_mode), _RealWhereNoWeightTouched():
        yield fake_mode


@contextlib.contextmanager
def simulated_process_group(world_size: int) -> Iterator[None]:
    """Inside, this process is rank 0 of ``world_size`` processes, alone: torch's fake process group (collectives
    do nothing, no other process exists), which accelerate takes for its own. A trainer built inside with
    ``fsdp=True`` and ``cpu=True`` shards its transformer over ``world_size`` GPUs, and :func:`simulate_update` counts
    one GPU's memory (rank 0's: every rank holds the same shares).

    Enter it before :func:`simulated_tensors` (accelerate's state is made here). It refuses a process that already
    has a process group. On exit the process group is destroyed, and accelerate's shared state, the launcher's
    environment variables and torch's thread count are as they were: a process can simulate several sizes.
    """
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, GradientState, PartialState

    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    if dist.is_initialized():
        raise RuntimeError("a process group is already initialized in this process: simulate in a fresh one")
    # What a launcher sets and accelerate reads (rank 0 of world_size on one machine).
    environment = {
        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
    }  # fmt: skip
    saved_environment = {key: os.environ.get(key) for key in environment}
    saved_states = [(state, dict(state._shared_state)) for state in (PartialState, AcceleratorState, GradientState)]
    threads = torch.get_num_threads()
    for state, _ in saved_states:
        state._shared_state.clear()
    os.environ.update(environment)
    try:
        dist.init_process_group("fake", rank=0, world_size=world_size, store=dist.HashStore())
        try:
            with warnings.catch_warnings():
                # accelerate sets torch's threads to the cores / world_size of a multi-CPU run (and warns): the
                # simulation is one process, which keeps its threads (set back below).
                warnings.filterwarnings("ignore", message=r"OMP_NUM_THREADS/MKL_NUM_THREADS unset")
                state = PartialState(cpu=True)
            torch.set_num_threads(threads)
            # accelerate's multi-CPU device is cpu:<local rank>. A real CPU tensor drops the index, a fake one keeps it
            # and then refuses to meet a "cpu" one (FakeTensorDeviceMismatchError: cpu:0 and cpu): plain "cpu", as
            # the trainer's Accelerator (which shares this state) gives a single process.
            state.device = torch.device("cpu")
            yield
        finally:
            dist.destroy_process_group()
    finally:
        torch.set_num_threads(threads)
        for state, saved in saved_states:
            state._shared_state.clear()
            state._shared_state.update(saved)
        for key, value in saved_environment.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _real_factories(enabled: bool = True) -> Iterator[None]:
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    modes = [mode for mode in _get_current_dispatch_mode_stack() if isinstance(mode, _RealWhereNoWeightTouched)]
    if not modes:
        raise RuntimeError("the trainer is simulated inside simulated_tensors(), where its models were built")
    mode = modes[-1]
    previous, mode.real_factories = mode.real_factories, enabled
    try:
        yield
    finally:
        mode.real_factories = previous


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


#: The CPU's fused attention, which torch's FLOP counter lacks (it counts the CUDA kernels): the same formulas.
CPU_ATTENTION_FLOP_FORMULAS = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
}


class _GlobalScopeOnly:
    """Stands in for ``FlopCounterMode``'s ``ModuleTracker``: every FLOP is counted in the one scope ``"Global"``,
    and no hook is registered on any module or tensor."""

    parents = frozenset({"Global"})

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return None


class UpdateFlopCounter(FlopCounterMode):
    """torch's ``FlopCounterMode`` (its formulas, decompositions and higher-order ops) counting the total alone, and
    the CPU's fused attention too (:data:`CPU_ATTENTION_FLOP_FORMULAS`).

    The per-module table is dropped because its ``ModuleTracker`` leaks under activation checkpointing (see the
    module docstring); ``get_total_flops()`` is all the simulator reads.
    """

    def __init__(self):
        super().__init__(display=False, custom_mapping=CPU_ATTENTION_FLOP_FORMULAS)
        self.mod_tracker = _GlobalScopeOnly()

    def counts(self) -> dict:
        """FLOPs so far, by op."""
        return dict(self.flop_counts["Global"])

    def add(self, counts: dict) -> None:
        """Count ``counts`` (FLOPs by op) as if their ops ran again."""
        for op, flops in counts.items():
            self.flop_counts["Global"][op] += flops


@dataclass(frozen=True)
class _TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


@dataclass(frozen=True)
class _RecordedCall:
    """What a simulated call cost (FLOPs by op, the memory's rise by category) and what it returned (its pytree, with
    :class:`_TensorMeta` for each tensor)."""

    flops: dict
    rise: dict[str, int]
    output_spec: TreeSpec
    output_leaves: tuple
    site: str = ""


class RepeatedCallReplay:
    """Simulates each distinct no-grad call of ``module`` once and replays its repeats: the same FLOPs, the same rise
    of the memory above the level it starts from, and fresh fake outputs of the same shapes.

    The key of a call: its tensors' shapes, strides, dtypes, devices and ``requires_grad`` (not their values, real
    ones included: in every supported family a call's cost follows from its inputs' shapes), every other argument's
    value, the module's train/eval modes, the state of its LoRA layers (disabled, active adapters, merged) and
    autocast. A rollout's steps differ only in the values of their inputs, so its first step is simulated and the
    others replayed, which keeps a full-size update to seconds of Python per rollout instead of a minute. The
    simulator's tests hold the replayed update to the one simulated call by call, number for number. A call with
    gradient is always simulated (autograd needs its graph), and so is one whose outputs cannot be replayed exactly
    (a real tensor, a view, one that requires grad). What the first call leaves behind besides its outputs is taken
    for a cache its repeats find filled (autocast's weight copies, rotary tables), not made again.
    """

    def __init__(self, module: torch.nn.Module, memory: LiveBytes, flops: UpdateFlopCounter):
        self.module, self.memory, self.flops = module, memory, flops
        self.submodules = list(module.modules())
        self.lora_layers = [layer for layer in self.submodules if isinstance(layer, BaseTunerLayer)]
        self.recorded: dict[tuple, _RecordedCall | None] = {}
        self.replayed = 0

    def __enter__(self) -> RepeatedCallReplay:
        self._own_forward = self.module.__dict__.get("forward")  # accelerate's wrapper, where it put one
        inner = self.module.forward
        self.module.forward = lambda *args, **kwargs: self._call(inner, args, kwargs)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._own_forward is None:
            del self.module.forward
        else:
            self.module.forward = self._own_forward

    def _key(self, args, kwargs) -> tuple | None:
        leaves, spec = tree_flatten((args, kwargs))
        inputs = []
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                inputs.append((tuple(leaf.shape), leaf.stride(), leaf.dtype, leaf.device, leaf.requires_grad, isinstance(leaf, FakeTensor)))
            else:
                try:
                    hash(leaf)
                except TypeError:
                    return None
                inputs.append(leaf)
        devices = {"cpu", *(leaf.device.type for leaf in leaves if isinstance(leaf, torch.Tensor))}
        autocast = tuple((d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in sorted(devices))
        lora = tuple((layer.disable_adapters, tuple(layer.active_adapters), layer.merged) for layer in self.lora_layers)
        modes = tuple(module.training for module in self.submodules)
        return (repr(spec), tuple(inputs), autocast, lora, modes)

    def _call(self, inner, args, kwargs):
        key = None if torch.is_grad_enabled() else self._key(args, kwargs)
        if key is None:
            return inner(*args, **kwargs)
        if key in self.recorded and self.recorded[key] is not None:
            return self._replay(self.recorded[key])
        flops_before = self.flops.counts()
        with self.memory.rise() as stretch:
            output = inner(*args, **kwargs)
        flops = {op: count - flops_before.get(op, 0) for op, count in self.flops.counts().items()}
        self.recorded[key] = self._record(output, flops, stretch)
        return output

    def _record(self, output, flops: dict, stretch: Stretch) -> _RecordedCall | None:
        """What a replay of this call needs, or ``None`` where its outputs cannot be made afresh."""
        leaves, spec = tree_flatten(output)
        recorded, storages = [], set()
        for leaf in leaves:
            if not isinstance(leaf, torch.Tensor):
                recorded.append(leaf)
                continue
            storage = leaf.untyped_storage()
            whole = leaf.is_contiguous() and storage.nbytes() == leaf.numel() * leaf.element_size()
            if not isinstance(leaf, FakeTensor) or leaf.requires_grad or not whole or storage._cdata in storages:
                return None
            storages.add(storage._cdata)
            recorded.append(_TensorMeta(tuple(leaf.shape), leaf.dtype, leaf.device))
        # What the call made and left behind besides its outputs is a cache (autocast's copies of the weights in
        # the compute dtype, rotary tables): a repeat finds it made and alive, so its rise leaves out the part of
        # it that stood at the call's peak.
        cached = self.memory.alive_from(stretch.first_allocation, stretch.peak_allocation, excluding=storages)
        rise = {category: value - cached.get(category, 0) for category, value in stretch.rise.items()}
        return _RecordedCall(flops, rise, spec, tuple(recorded), stretch.site)

    def _replay(self, call: _RecordedCall):
        self.replayed += 1
        self.memory.replay_rise(call.rise, call.site, self.memory.parts[-1] if self.memory.parts else "other")
        self.flops.add(call.flops)
        with _real_factories(False):
            leaves = [
                torch.empty(leaf.shape, dtype=leaf.dtype, device=leaf.device) if isinstance(leaf, _TensorMeta) else leaf
                for leaf in call.output_leaves
            ]
        return tree_unflatten(leaves, call.output_spec)


@dataclass
class UpdateCost:
    """What one simulated update costs. Bytes are of the training device; FLOPs are floating-point operations."""

    peak_bytes: int
    #: FLOPs of ``training_step`` itself: the rollout, and TailorPO's ranked pairs.
    sampling_flops: int
    #: FLOPs of the micro-step losses (forwards with gradient, VAE and reward), their backward passes and the step.
    gradient_flops: int
    #: Parameters of the transformer without the LoRA, and the trained ones (the LoRA's, or all in a full fine-tune).
    transformer_params: int
    trainable_params: int
    #: The tracker's categories at the peak (frozen weights, trained weights, gradients, optimizer state, ...; under
    #: FSDP one GPU's shares, and FSDP's "unsharded weights" and "fsdp comm buffers").
    peak_by_category: dict[str, int] = field(default_factory=dict)
    #: Transformer calls replayed rather than simulated (:class:`RepeatedCallReplay`).
    replayed_calls: int = 0
    #: Where the update was at the peak, in words (:func:`_allocation_site`).
    peak_site: str = ""
    #: The activations at the peak by the part of the update that made them: ``"transformer"``, ``"VAE"``,
    #: ``"reward"`` (made by its forward: saved for the backward, still alive, or recomputed by checkpointing in a
    #: backward pass), ``"backward"`` (the backward passes' gradients and temporaries), ``"other"`` (the trainer's
    #: own tensors: latents, noise, losses).
    peak_activations_by_part: dict[str, int] = field(default_factory=dict)

    @property
    def flops(self) -> int:
        return self.sampling_flops + self.gradient_flops

    @property
    def frozen_weight_bytes(self) -> int:
        """Weights of the transformer that are not trained (the whole base model under LoRA; none in a full fine-tune)."""
        return self.peak_by_category.get("frozen weights", 0)

    @property
    def training_state_bytes(self) -> int:
        """Trained weights, their gradients at the peak and the optimizer state (AdamW: two fp32 moments per weight)."""
        return sum(self.peak_by_category.get(key, 0) for key in ("trained weights", "gradients", "optimizer state"))

    @property
    def vae_and_reward_bytes(self) -> int:
        """Weights of the VAE and of the reward (both frozen)."""
        return self.peak_by_category.get("vae and reward", 0)

    @property
    def dequantized_weight_bytes(self) -> int:
        """A quantized base's weights dequantized to compute with, alive at the peak (:data:`DEQUANTIZED_CATEGORY`)."""
        return self.peak_by_category.get(DEQUANTIZED_CATEGORY, 0)

    @property
    def activation_bytes(self) -> int:
        """Everything else alive at the peak: activations saved for backward, temporaries, the latents."""
        return self.peak_by_category.get("activations", 0)


#: Where a storage made by a simulated quantized layer's dequantization is counted (:class:`LiveBytes`).
DEQUANTIZED_CATEGORY = "dequantized weights"
#: bitsandbytes' fused 4-bit kernel on CUDA serves a product of at most this many rows without dequantizing the weight
#: (``_GEMM_4BIT_CUSTOM_FLOOR_M``); above it, a Hopper GPU (and any GPU past 1536 rows) dequantizes and calls
#: ``F.linear``, which the simulation takes for every size above it (the most memory: one layer's bf16 weight more).
#: bitsandbytes' CPU backend always dequantizes (0).
NF4_FUSED_MAX_ROWS = 4


def _file_as_dequantized(tensor: torch.Tensor) -> torch.Tensor:
    """Count ``tensor`` (just made) as a dequantized weight in every memory tracker running."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    for mode in _get_current_dispatch_mode_stack():
        if isinstance(mode, LiveBytes):
            mode.track(tensor, DEQUANTIZED_CATEGORY)
    return tensor


class SimulatedQuantizedLinear(torch.nn.Linear):
    """A frozen linear layer as a quantization backend stores it, for the simulator: ``weight`` is a frozen parameter
    holding the packed data (its real dtype and size, 8-bit storage for float8, whose bits an integer parameter holds so
    that diffusers still reads the model's dtype as the compute dtype), the format's other tensors are buffers, and the
    forward runs the backend's ops on them. Built by :func:`simulated_quantization` from a ``nn.Linear``; peft wraps it
    with a LoRA as any ``nn.Linear`` (``compute_dtype`` gives the LoRA its dtype, as bitsandbytes' layers do).

    The values are those of fake tensors (none): a layer for :func:`simulated_tensors` only."""

    #: The ``--quantize`` name of the format.
    format = ""

    def __init__(self, linear: torch.nn.Linear, compute_dtype: torch.dtype = torch.bfloat16):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = compute_dtype
        self.bias = linear.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.weight = torch.nn.Parameter(self._packed_weight(linear.weight), requires_grad=False)

    def _packed_weight(self, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _new(self, like: torch.Tensor, shape, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=like.device)

    @property
    def weight_numel(self) -> int:
        """Weights the layer holds (those of the unquantized layer)."""
        return self.in_features * self.out_features

    @property
    def simulated_format(self) -> str:
        """What ``quantization.quantization_of`` reports, so that the trainer treats the model as quantized."""
        return self.format

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, format={self.format} (simulated)"


class _NF4Linear(SimulatedQuantizedLinear):
    """bitsandbytes' ``Linear4bit`` with NF4 and double quantization (bitsandbytes 0.50, QLoRA's format, as diffusers'
    ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)`` makes it):
    ``weight``: two 4-bit codes a byte, ``[(n + 1) // 2, 1]`` uint8; its ``QuantState``: one absmax per 64 weights,
    quantized to uint8 (``absmax``), their mean in fp32 (``offset``), and their own state: one fp32 absmax per 256
    (``state2_absmax``) and the 256-entry fp32 code; and the 16-entry fp32 NF4 code. Each layer holds its own codes.

    Forward (``MatMul4Bit``, ``gemm_4bit``): up to :data:`NF4_FUSED_MAX_ROWS` rows the fused kernel, without the
    dequantized weight; above, the absmax dequantized (fp32), the offset added, the weight dequantized to the compute
    dtype and ``F.linear``. Backward: the absmax and the weight dequantized again for the input's gradient; nothing but
    the packed weight is kept between the two."""

    format = "nf4"
    blocksize = 64
    state2_blocksize = 256

    def _packed_weight(self, weight):
        n = weight.numel()
        blocks = -(-n // self.blocksize)
        self.register_buffer("absmax", self._new(weight, (blocks,), torch.uint8))
        self.register_buffer("offset", self._new(weight, (), torch.float32))
        self.register_buffer("state2_absmax", self._new(weight, (-(-blocks // self.state2_blocksize),), torch.float32))
        self.register_buffer("state2_code", self._new(weight, (256,), torch.float32))
        self.register_buffer("code", self._new(weight, (16,), torch.float32))
        return self._new(weight, ((n + 1) // 2, 1), torch.uint8)

    def dequantized_absmax(self) -> torch.Tensor:
        """``dequantize_blockwise`` of the 8-bit absmax: one fp32 per block (the offset not added)."""
        return _file_as_dequantized(self.absmax.to(torch.float32))

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return _file_as_dequantized(self.weight.new_empty((self.out_features, self.in_features), dtype=dtype))

    def forward(self, x):
        inp_dtype = x.dtype
        x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return _NF4MatMul.apply(x, bias, self).to(inp_dtype)


class _NF4MatMul(torch.autograd.Function):
    """bitsandbytes' ``MatMul4Bit`` on a simulated NF4 layer (see :class:`_NF4Linear`)."""

    @staticmethod
    def forward(ctx, x, bias, layer):
        ctx.layer = layer  # bitsandbytes keeps the packed weight, a parameter, alive anyway
        rows = x.numel() // x.shape[-1]
        if rows <= NF4_FUSED_MAX_ROWS:
            # The fused kernel: the product's FLOPs and output, no dequantized weight (a 2-byte stand-in, expanded).
            stand_in = layer.weight.new_empty((), dtype=x.dtype).expand(layer.out_features, layer.in_features)
            return torch.nn.functional.linear(x, stand_in, bias)
        # gemm_4bit's fallback: the absmax dequantized, the offset added into a new tensor, both kept until it returns.
        absmax = layer.dequantized_absmax()
        shifted = _file_as_dequantized(absmax + layer.offset)
        weight = layer.dequantized_weight(x.dtype)
        output = torch.nn.functional.linear(x, weight, bias)
        del absmax, shifted, weight
        return output

    @staticmethod
    def backward(ctx, grad_output):
        layer = ctx.layer
        grad_x = None
        if ctx.needs_input_grad[0]:
            absmax = layer.dequantized_absmax().add_(layer.offset)  # F.dequantize_4bit adds it in place
            weight = layer.dequantized_weight(layer.compute_dtype).to(grad_output.dtype)
            grad_x = torch.matmul(grad_output, weight)
            del absmax, weight
        return grad_x, None, None


class _Int8Linear(SimulatedQuantizedLinear):
    """torchao's int8 weight-only layer (torchao 0.18, ``Int8WeightOnlyConfig``: an ``Int8Tensor`` weight, per-row):
    ``weight``: int8 ``[out, in]``; ``scale``: one fp32 per output row; ``zero_point``: one int8 per row (symmetric, so
    zero, but held).

    Forward (``F.linear`` of an ``Int8Tensor``): the int8 weight cast to the input's dtype, ``mm``, times the scale,
    plus the bias. Under autograd the cast weight is what the ``mm`` keeps for the input's gradient."""

    format = "int8"

    def _packed_weight(self, weight):
        self.register_buffer("scale", self._new(weight, (self.out_features, 1), torch.float32))
        self.register_buffer("zero_point", self._new(weight, (self.out_features, 1), torch.int8))
        return self._new(weight, (self.out_features, self.in_features), torch.int8)

    def forward(self, x):
        output_dtype = x.dtype
        weight = _file_as_dequantized(self.weight.t().to(output_dtype))
        m = torch.mm(x.reshape(-1, x.shape[-1]), weight)
        del weight
        y = m * self.scale.to(m.dtype).flatten()
        y = y.reshape(*x.shape[:-1], self.out_features)
        if self.bias is not None:
            y += self.bias
        return y.to(output_dtype)


class _Float8Linear(SimulatedQuantizedLinear):
    """torchao's float8 weight-only layer (torchao 0.18, ``Float8WeightOnlyConfig``: a ``Float8Tensor`` weight, e4m3,
    per-row): ``weight``: the float8 bits, ``[out, in]`` bytes (a uint8 parameter, viewed as float8 to compute);
    ``scale``: one fp32 per output row.

    Forward (``F.linear`` of a ``Float8Tensor``, no activation quantization): the weight dequantized (float8 to fp32,
    times the scale, to the compute dtype: the three alive at once) and ``matmul``, plus the bias. Under autograd
    the dequantized weight is what the product keeps for the input's gradient."""

    format = "float8"

    def _packed_weight(self, weight):
        self.register_buffer("scale", self._new(weight, (self.out_features, 1), torch.float32))
        return self._new(weight, (self.out_features, self.in_features), torch.uint8)

    def _dequantized(self) -> torch.Tensor:
        # Float8Tensor.t() then dequantize(): _dequantize_affine_float8 of the transposed data and scale.
        fp32 = _file_as_dequantized(self.weight.view(torch.float8_e4m3fn).t().to(torch.float32))
        scaled = _file_as_dequantized(fp32 * self.scale.t())
        return _file_as_dequantized(scaled.to(self.compute_dtype))

    def forward(self, x):
        output = torch.matmul(x, self._dequantized())
        return output if self.bias is None else output + self.bias


_SIMULATED_FORMATS = {cls.format: cls for cls in (_NF4Linear, _Int8Linear, _Float8Linear)}


def simulated_quantization(module: torch.nn.Module, name: str, compute_dtype: torch.dtype = torch.bfloat16):
    """Replace ``module``'s linear layers, in place, by the :class:`SimulatedQuantizedLinear` of format ``name``
    (``nf4``, ``int8`` or ``float8``): the layers that ``diffusers_srpo.quantization.quantize_in_memory`` quantizes,
    with the same bytes, for :func:`simulated_tensors` (where the backends cannot run). Call it where
    ``quantize_in_memory`` would be called: after the model is built in its dtype, before a LoRA is added."""
    if name not in _SIMULATED_FORMATS:
        raise ValueError(f"simulated quantization is one of {', '.join(_SIMULATED_FORMATS)}, got {name!r}")
    layer_class = _SIMULATED_FORMATS[name]
    for parent in list(module.modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, torch.nn.Linear) or isinstance(child, SimulatedQuantizedLinear):
                continue
            if name != "nf4" and isinstance(child, torch.nn.modules.linear.NonDynamicallyQuantizableLinear):
                continue  # torchao's quantize_ leaves these alone (bitsandbytes converts them)
            setattr(parent, child_name, layer_class(child, compute_dtype))
    return module


def base_parameter_count(transformer: torch.nn.Module) -> int:
    """Parameters of the transformer itself, without a LoRA added for training (11.9B for FLUX.1-dev); a quantized
    layer's weights counted as the unquantized layer's (bitsandbytes and the simulation pack two 4-bit weights a byte)."""
    count = 0
    for name, p in transformer.named_parameters():
        if "lora_" in name:
            continue
        quant_state = getattr(p, "quant_state", None)  # bitsandbytes' Params4bit
        count += math.prod(quant_state.shape) if quant_state is not None else p.numel()
    for layer in transformer.modules():
        if isinstance(layer, SimulatedQuantizedLinear):
            count += layer.weight_numel - layer.weight.numel()
    return count


def _bytes_of(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class LiveBytes(TorchDispatchMode):
    """The bytes of the tensor storages alive at once, by category, and their peak: a dispatch-mode memory tracker.

    Every storage an op creates is counted until it is freed (a weak reference's callback); tensors made before
    are counted once :meth:`track` names them. New storages are ``"activations"`` (activations, temporaries,
    latents) unless :meth:`track` files them elsewhere, as the gradients' hook does. (torch's ``MemTracker`` does the
    same, but refuses a root module called more than once per update, as the rollout calls the transformer.)

    Sharded tensors (FSDP2, under :func:`simulated_process_group`) are counted as one GPU holds them: a DTensor by its
    local shard, DTensor ops by the ops on the local shards they turn into, storages that FSDP frees and re-allocates
    in place by their size (``UntypedStorage.resize_``), nothing of DTensor's sharding propagation, and FSDP's
    buffers in their own categories: ``"unsharded weights"`` (a block's parameters, all-gathered while it runs) and
    ``"fsdp comm buffers"`` (all-gather and reduce-scatter buffers; a reduce-scatter output becomes ``"gradients"``).
    """

    def __init__(self):
        super().__init__()
        self.current: dict[str, int] = {}
        self.peak_total = 0
        self.peak: dict[str, int] = {}
        # Storage key -> (category, bytes, number of the allocation): storages are numbered as they are first seen.
        self._live: dict[int, tuple[str, int, int]] = {}
        self.allocations = 0
        #: The number of the last allocation before the peak (of the current :meth:`rise` stretch, inside one).
        self.peak_allocation = 0
        #: Where the update was at the peak, in words (:func:`_allocation_site`).
        self.peak_site = ""
        #: The model parts running (innermost last; :meth:`in_part`): new activations are counted as theirs.
        self.parts: list[str] = []
        #: Bytes of ``"activations"`` by the part that made them, now and at the peak (:meth:`_part_now`).
        self.activations_by_part: dict[str, int] = {}
        self.peak_activations_by_part: dict[str, int] = {}
        self._part_of: dict[int, str] = {}  # storage key -> part, for the activations
        # Whether a process group was initialized when the tracker was entered: FSDP's buffers are looked for then.
        self._distributed = False
        # Inside DTensor's sharding propagation (a depth): nothing is counted.
        self._propagating = 0
        self._restore: list[tuple[type, str, object]] = []

    def track(self, tensor: torch.Tensor, category: str) -> None:
        """Count ``tensor``'s storage under ``category`` (moving it there if it is counted elsewhere); a DTensor's, its
        local shard's."""
        self._track_storage(_local_shard(tensor).untyped_storage(), category)

    def _track_storage(self, storage: torch.UntypedStorage, category: str) -> None:
        key = storage._cdata
        if key in self._live:
            old_category, size, number = self._live[key]
            self.current[old_category] -= size
        else:
            size = storage.nbytes()
            self.allocations += 1
            number = self.allocations
            weakref.finalize(storage, self._free, key)
        self._live[key] = (category, size, number)
        self.current[category] = self.current.get(category, 0) + size
        part = self._part_of.pop(key, None)
        if part is not None:
            self.activations_by_part[part] -= size
        if category == "activations":
            part = self._part_now()
            self._part_of[key] = part
            self.activations_by_part[part] = self.activations_by_part.get(part, 0) + size
        self._update_peak()

    def _free(self, key: int) -> None:
        category, size, _ = self._live.pop(key)
        self.current[category] -= size
        part = self._part_of.pop(key, None)
        if part is not None:
            self.activations_by_part[part] -= size

    def _part_now(self) -> str:
        """The part of the update that makes an activation now: the model part whose forward runs (recomputed by
        checkpointing too), else ``"backward"`` inside a backward pass, else ``"other"``."""
        if self.parts:
            return self.parts[-1]
        return "backward" if torch._C._current_autograd_node() is not None else "other"

    def in_part(self, module: torch.nn.Module, part: str) -> list:
        """Count the activations made while ``module`` runs forward as ``part``'s; returns the hooks' handles."""

        def enter(*_):
            self.parts.append(part)

        def leave(*_):
            self.parts.pop()

        return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave, always_call=True)]

    def _update_peak(self) -> None:
        total = sum(self.current.values())
        if total > self.peak_total:
            self.peak_total = total
            self.peak = dict(self.current)
            self.peak_allocation = self.allocations
            self.peak_site = _allocation_site(sys._getframe(1))
            self.peak_activations_by_part = {part: size for part, size in self.activations_by_part.items() if size}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _has_dtensor(types):
            # What a GPU allocates are the ops on the local shards that DTensor turns this one into: they come back
            # through here (a DTensor's own storage is a wrapper of the global size, which no device holds).
            return NotImplemented
        if self._propagating:
            return func(*args, **(kwargs or {}))
        if func is _WAIT_TENSOR and isinstance(args[0], FakeTensor):
            # A functional collective's wait returns its input; the fake kernel returns a new tensor (torch's
            # MemTracker makes the same exception).
            return args[0]
        out = func(*args, **(kwargs or {}))
        category = None
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage()._cdata not in self._live:
                if category is None:
                    category = self._category_of_copy(func, args)
                if category is None:
                    category = _fsdp_category(_distributed_caller(sys._getframe())) if self._distributed else "activations"
                self.track(tensor, category)
        return out

    def _category_of_copy(self, func, args) -> str | None:
        """A copy of a dequantized weight (autocast's cast of it to the compute dtype) is one too."""
        if func in _COPIES and isinstance(args[0], torch.Tensor):
            live = self._live.get(args[0].untyped_storage()._cdata)
            if live is not None and live[0] == DEQUANTIZED_CATEGORY:
                return DEQUANTIZED_CATEGORY
        return None

    def __enter__(self):
        import torch.distributed as dist

        self._distributed = dist.is_available() and dist.is_initialized()
        self._restore = []
        # FSDP frees a block's unsharded parameters by resizing their storage to 0 bytes and allocates them again by
        # resizing it back (UntypedStorage.resize_), which no dispatch mode sees: the sizes are followed here (torch's
        # MemTracker wraps resize_ likewise).
        resize = torch.UntypedStorage.resize_

        @functools.wraps(resize)
        def resize_(storage, size):
            out = resize(storage, size)
            self._resized(storage, sys._getframe(1))
            return out

        self._replace(torch.UntypedStorage, "resize_", resize_)
        # DTensor finds the global shape of an op's result by running the op on empty global-shape tensors in the
        # active fake mode (ShardingPropagator._propagate_tensor_meta_non_cached), ours: no device holds them (for
        # clip_grad_norm_'s foreach ops that would be the whole model's gradients at once). Not counted.
        propagation = sys.modules.get("torch.distributed.tensor._sharding_prop")  # no DTensor exists before
        if propagation is not None:
            propagator = propagation.ShardingPropagator
            propagate = propagator._propagate_tensor_meta_non_cached

            @functools.wraps(propagate)
            def propagate_uncounted(*args, **kwargs):
                self._propagating += 1
                try:
                    return propagate(*args, **kwargs)
                finally:
                    self._propagating -= 1

            self._replace(propagator, "_propagate_tensor_meta_non_cached", propagate_uncounted)
        try:
            return super().__enter__()
        except BaseException:
            self._put_back()
            raise

    def __exit__(self, *exc_info):
        try:
            return super().__exit__(*exc_info)
        finally:
            self._put_back()

    def _replace(self, owner: type, name: str, value) -> None:
        """Set ``owner.name`` while the tracker is entered (the class's own attribute, or none, again on exit)."""
        self._restore.append((owner, name, owner.__dict__.get(name, _INHERITED)))
        setattr(owner, name, value)

    def _put_back(self) -> None:
        while self._restore:
            owner, name, value = self._restore.pop()
            if value is _INHERITED:
                delattr(owner, name)
            else:
                setattr(owner, name, value)

    def _resized(self, storage: torch.UntypedStorage, caller) -> None:
        """Follow a storage resized in place: a counted one changes size; one not counted yet (made before the
        tracker, by FSDP) is counted from its new size on."""
        key = storage._cdata
        if key not in self._live:
            if storage.nbytes():
                module = caller.f_globals.get("__name__", "") if caller is not None else ""
                self._track_storage(storage, "unsharded weights" if module == _FSDP_PARAM else "activations")
            return
        category, old, number = self._live[key]
        new = storage.nbytes()
        self._live[key] = (category, new, number)
        self.current[category] += new - old
        if key in self._part_of:
            self.activations_by_part[self._part_of[key]] += new - old
        self._update_peak()

    @contextlib.contextmanager
    def rise(self) -> Iterator[Stretch]:
        """Measure a stretch of the run (:class:`Stretch`, filled on exit). The overall peak is kept as if nothing
        was measured."""
        start = dict(self.current)
        outer = (self.peak_total, self.peak, self.peak_allocation, self.peak_site, self.peak_activations_by_part)
        self.peak_total, self.peak, self.peak_allocation = sum(start.values()), dict(start), self.allocations
        self.peak_site = ""
        stretch = Stretch(first_allocation=self.allocations + 1)
        try:
            yield stretch
        finally:
            stretch.rise = {key: value - start.get(key, 0) for key, value in self.peak.items()}
            stretch.peak_allocation = self.peak_allocation
            stretch.site = self.peak_site
            if outer[0] >= self.peak_total:
                self.peak_total, self.peak, self.peak_allocation, self.peak_site, self.peak_activations_by_part = outer

    def alive_from(self, first: int, last: int, excluding: set[int] = frozenset()) -> dict[str, int]:
        """Bytes by category of the storages still alive among allocations ``first`` to ``last`` (and not in
        ``excluding``, storage keys)."""
        alive: dict[str, int] = {}
        for key, (category, size, number) in self._live.items():
            if first <= number <= last and key not in excluding:
                alive[category] = alive.get(category, 0) + size
        return alive

    def replay_rise(self, rise: dict[str, int], site: str = "", part: str = "other") -> None:
        """Count a stretch measured by :meth:`rise` as if it ran again from the current level (``site``: where the
        stretch peaked; ``part``: whose activations it made)."""
        at_peak = {key: self.current.get(key, 0) + rise.get(key, 0) for key in {*self.current, *rise}}
        if sum(at_peak.values()) > self.peak_total:
            self.peak_total, self.peak = sum(at_peak.values()), at_peak
            self.peak_site = f"{site} (a repeated call, replayed)"
            by_part = dict(self.activations_by_part)
            by_part[part] = by_part.get(part, 0) + rise.get("activations", 0)
            self.peak_activations_by_part = {key: size for key, size in by_part.items() if size}


def _fsdp_category(caller: tuple[str, str] | None) -> str:
    """The category of a new storage by the code that made it: FSDP's all-gather outputs (a block's unsharded
    parameters, ``FSDPParam.init_all_gather_outputs``) and its collectives' buffers; anything else an activation."""
    if caller is not None:
        module, function = caller
        if module == _FSDP_COLLECTIVES:
            return "fsdp comm buffers"
        if module == _FSDP_PARAM and function == "init_all_gather_outputs":
            return "unsharded weights"
    return "activations"


_INHERITED = object()  # LiveBytes._replace: an attribute that the class inherits
#: Ops whose output is a copy of their first input (LiveBytes._category_of_copy).
_COPIES = (_aten._to_copy.default, _aten.clone.default)

try:
    _WAIT_TENSOR = torch.ops._c10d_functional.wait_tensor.default
except (AttributeError, RuntimeError):  # torch without distributed
    _WAIT_TENSOR = None


@dataclass
class Stretch:
    """A stretch of the run measured by :meth:`LiveBytes.rise`: how far each category stood above its level at the
    start when the stretch peaked, and the numbers of its first allocation and of the last one before its peak."""

    first_allocation: int
    rise: dict[str, int] = field(default_factory=dict)
    peak_allocation: int = 0
    #: Where the stretch peaked (:func:`_allocation_site`).
    site: str = ""


#: Model code by the package it lives in: the part of the update it is.
_MODEL_PARTS = (
    ("diffusers.models.transformers.", "transformer"),
    ("diffusers.models.autoencoders.", "VAE"),
    ("diffusers_srpo.rewards", "reward"),
    ("open_clip", "reward"),
    ("transformers.", "text encoder"),
)


def _allocation_site(frame) -> str:
    """Where the update is at ``frame`` (an allocation's), in words: the part of the model running (the outermost frame
    of a model's code, and the innermost frame outside torch), forward with or without gradient or backward (the
    autograd node running), and the trainer's function it runs under. In a backward pass outside any recomputation no
    model code runs: the node's name tells the op (a convolution's is most likely the VAE's)."""
    part = outer = inner = trainer = None
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module != "torch" and not module.startswith("torch.") and module != __name__:
            code = frame.f_code
            name = getattr(code, "co_qualname", code.co_name)
            inner = inner or name
            for prefix, what in _MODEL_PARTS:
                if module.startswith(prefix):
                    part, outer = what, name
            own = module.startswith("diffusers_srpo.") and not module.startswith("diffusers_srpo.rewards")
            trainer = trainer or (name if own else None)
        frame = frame.f_back
    node = torch._C._current_autograd_node()
    if node is not None:
        phase = f"backward [{node.name()}]" + (", recomputing" if part else "")
    else:
        phase = "forward with gradient" if torch.is_grad_enabled() else "forward without gradient"
    where = phase
    if part:
        where = f"{part}: {phase}; in {outer}" + (f" > {inner}" if inner != outer else "")
    return where + (f"; from {trainer}" if trainer else "")


def simulated_trainer(trainer_class, pipe, **kwargs):
    """``trainer_class(pipe, **kwargs)``, built inside :func:`simulated_tensors` for :func:`simulate_update`.

    The trainer's setup encodes every prompt (the text encoders then leave the device), and that runs with the
    update's real small factories: a text encoder built with real weights encodes for real (Qwen-Image's pipeline
    selects the attended tokens by their mask, whose count a fake tensor cannot know). The LoRA's matrices, each far
    below ``REAL_NUMEL_LIMIT`` elements, are then real too: they cost what fake ones would in the counts.
    """
    with _real_factories():
        return trainer_class(pipe, **kwargs)


def prepare_steady_update(trainer) -> None:
    """Bring ``trainer`` to where an update of a running ``train()`` starts: the optimizer state of the second update
    on (AdamW makes its moments lazily on the first step; the prompts were encoded by the trainer's setup). On fake
    weights the step costs nothing; on real ones it moves nothing (zero gradients, and a simulated or measured
    update's weights are not kept)."""
    for parameter in trainer.trainable_parameters:
        parameter.grad = torch.zeros_like(parameter)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


def track_update_tensors(memory: LiveBytes, trainer, transformer: torch.nn.Module, held=None) -> list:
    """Count in ``memory`` what an update of ``trainer`` starts with (the transformer's weights, the VAE and the reward,
    the optimizer state), hook the gradients as they arrive and every submodule's part; returns the hooks' handles.
    ``held(tensor)``: the tensors a parameter holds (a real quantized weight's packed data and scales; default the
    tensor itself)."""
    held = held or (lambda tensor: (tensor,))
    for tensor in [*transformer.parameters(), *transformer.buffers()]:
        for part in held(tensor):
            memory.track(part, "trained weights" if tensor.requires_grad else "frozen weights")
    for module in (trainer.pipe.vae, trainer.reward):
        for tensor in [*module.parameters(), *module.buffers()]:
            memory.track(tensor, "vae and reward")
    for state in trainer.optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                memory.track(value, "optimizer state")
    hooks = [
        parameter.register_post_accumulate_grad_hook(lambda p: memory.track(p.grad, "gradients"))
        for parameter in trainer.trainable_parameters
    ]
    # Every submodule, so that what checkpointing recomputes in a backward pass is its part's (the VAE runs through
    # decode() and encode(), not its forward).
    vae = trainer.pipe.vae
    for model, part in [(transformer, "transformer"), (vae, "VAE"), (trainer.reward, "reward")]:
        for module in model.modules():
            if module is not vae:
                hooks += memory.in_part(module, part)
    return hooks


def simulate_update(trainer, step: int = 0, replay_repeated_calls: bool = True) -> UpdateCost:
    """Run update ``step`` of ``trainer`` (built inside :func:`simulated_tensors`) and count its memory and FLOPs.

    ``replay_repeated_calls``: simulate each distinct no-grad call of the transformer once and replay its repeats
    (:class:`RepeatedCallReplay`; the same numbers, in a fraction of the time). A trainer with ``fsdp=True`` built
    inside :func:`simulated_process_group`: the memory of one GPU (rank 0), the FLOPs of one process."""
    from .trainers.stopping import StopRequest

    prepare_steady_update(trainer)
    transformer = trainer.accelerator.unwrap_model(trainer.model)

    memory = LiveBytes()
    hooks = track_update_tensors(memory, trainer, transformer)
    flop_counter = UpdateFlopCounter()
    sampling: list[int] = []
    training_step = trainer.training_step

    def counted_training_step(*args, **kwargs):
        output = training_step(*args, **kwargs)
        sampling.append(flop_counter.get_total_flops())
        return output

    trainer.training_step = counted_training_step
    try:
        replayer = RepeatedCallReplay(transformer, memory, flop_counter)
        with _real_factories(), flop_counter, memory, replayer if replay_repeated_calls else contextlib.nullcontext():
            trainer._run_update(step, StopRequest())
    finally:
        del trainer.training_step  # the class's own method again
        for hook in hooks:
            hook.remove()
    total_flops = flop_counter.get_total_flops()
    return UpdateCost(
        peak_bytes=memory.peak_total,
        sampling_flops=sampling[0],
        gradient_flops=total_flops - sampling[0],
        transformer_params=base_parameter_count(transformer),
        trainable_params=sum(p.numel() for p in trainer.trainable_parameters),
        peak_by_category=memory.peak,
        replayed_calls=replayer.replayed,
        peak_site=memory.peak_site,
        peak_activations_by_part=memory.peak_activations_by_part,
    )
