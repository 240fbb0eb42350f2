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

FLOPs are counted by :class:`UpdateFlopCounter`, torch's ``FlopCounterMode`` without its per-module attribution:
that attribution's ``ModuleTracker`` registers gradient hooks on the tensors of every module call, the calls that
activation checkpointing recomputes during backward included, and those hooks never fire and keep the recomputed
activations alive until the counter exits (pytorch/pytorch#139214). Under the whole update that made a checkpointed
peak larger than an unchecked one, on real tensors as on fake ones.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import TreeSpec, tree_flatten, tree_leaves, tree_unflatten
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

__all__ = ["REAL_NUMEL_LIMIT", "LiveBytes", "RepeatedCallReplay", "UpdateCost", "UpdateFlopCounter", "base_parameter_count", "prepare_steady_update", "simulate_update", "simulated_tensors", "simulated_trainer"]

#: Factories of at most this many elements run for real inside :func:`simulated_tensors` (noise, ids, schedules).
REAL_NUMEL_LIMIT = 2**24
_aten = torch.ops.aten


class _RealWhereNoWeightTouched(TorchDispatchMode):
    """Above a ``FakeTensorMode``: ops of real tensors only run for real; fake scalar reads get a stand-in value;
    small factories run for real while ``real_factories`` (during the update, never while models are built: their
    weights start as factories too)."""

    real_factories = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [x for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        if any(isinstance(x, FakeTensor) for x in tensors):
            if func is _aten._local_scalar_dense.default:
                dtype = args[0].dtype
                return True if dtype == torch.bool else 0.5 if dtype.is_floating_point else 0
            return func(*args, **kwargs)
        if tensors:
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        # A factory: its fake result tells the size before anything is allocated.
        fake = func(*args, **kwargs)
        if self.real_factories and all(x.numel() <= REAL_NUMEL_LIMIT for x in tree_leaves(fake) if isinstance(x, torch.Tensor)):
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
        return _RecordedCall(flops, rise, spec, tuple(recorded))

    def _replay(self, call: _RecordedCall):
        self.replayed += 1
        self.memory.replay_rise(call.rise)
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
    #: The tracker's categories at the peak (frozen weights, trained weights, gradients, optimizer state, ...).
    peak_by_category: dict[str, int] = field(default_factory=dict)
    #: Transformer calls replayed rather than simulated (:class:`RepeatedCallReplay`).
    replayed_calls: int = 0

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
    def activation_bytes(self) -> int:
        """Everything else alive at the peak: activations saved for backward, temporaries, the latents."""
        return self.peak_by_category.get("activations", 0)


def base_parameter_count(transformer: torch.nn.Module) -> int:
    """Parameters of the transformer itself, without a LoRA added for training (11.9B for FLUX.1-dev)."""
    return sum(p.numel() for name, p in transformer.named_parameters() if "lora_" not in name)


def _bytes_of(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class LiveBytes(TorchDispatchMode):
    """The bytes of the tensor storages alive at once, by category, and their peak: a dispatch-mode memory tracker.

    Every storage an op creates is counted until it is freed (a weak reference's callback); tensors made before
    are counted once :meth:`track` names them. New storages are ``"activations"`` (activations, temporaries,
    latents) unless :meth:`track` files them elsewhere, as the gradients' hook does. (torch's ``MemTracker`` does the
    same, but refuses a root module called more than once per update, as the rollout calls the transformer.)
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

    def track(self, tensor: torch.Tensor, category: str) -> None:
        """Count ``tensor``'s storage under ``category`` (moving it there if it is counted elsewhere)."""
        storage = tensor.untyped_storage()
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
        self._update_peak()

    def _free(self, key: int) -> None:
        category, size, _ = self._live.pop(key)
        self.current[category] -= size

    def _update_peak(self) -> None:
        total = sum(self.current.values())
        if total > self.peak_total:
            self.peak_total = total
            self.peak = dict(self.current)
            self.peak_allocation = self.allocations

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage()._cdata not in self._live:
                self.track(tensor, "activations")
        return out

    @contextlib.contextmanager
    def rise(self) -> Iterator[Stretch]:
        """Measure a stretch of the run (:class:`Stretch`, filled on exit). The overall peak is kept as if nothing
        was measured."""
        start, outer = dict(self.current), (self.peak_total, self.peak, self.peak_allocation)
        self.peak_total, self.peak, self.peak_allocation = sum(start.values()), dict(start), self.allocations
        stretch = Stretch(first_allocation=self.allocations + 1)
        try:
            yield stretch
        finally:
            stretch.rise = {key: value - start.get(key, 0) for key, value in self.peak.items()}
            stretch.peak_allocation = self.peak_allocation
            if outer[0] >= self.peak_total:
                self.peak_total, self.peak, self.peak_allocation = outer

    def alive_from(self, first: int, last: int, excluding: set[int] = frozenset()) -> dict[str, int]:
        """Bytes by category of the storages still alive among allocations ``first`` to ``last`` (and not in
        ``excluding``, storage keys)."""
        alive: dict[str, int] = {}
        for key, (category, size, number) in self._live.items():
            if first <= number <= last and key not in excluding:
                alive[category] = alive.get(category, 0) + size
        return alive

    def replay_rise(self, rise: dict[str, int]) -> None:
        """Count a stretch measured by :meth:`rise` as if it ran again from the current level."""
        at_peak = {key: self.current.get(key, 0) + rise.get(key, 0) for key in {*self.current, *rise}}
        if sum(at_peak.values()) > self.peak_total:
            self.peak_total, self.peak = sum(at_peak.values()), at_peak


@dataclass
class Stretch:
    """A stretch of the run measured by :meth:`LiveBytes.rise`: how far each category stood above its level at the
    start when the stretch peaked, and the numbers of its first allocation and of the last one before its peak."""

    first_allocation: int
    rise: dict[str, int] = field(default_factory=dict)
    peak_allocation: int = 0


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


def simulate_update(trainer, step: int = 0, replay_repeated_calls: bool = True) -> UpdateCost:
    """Run update ``step`` of ``trainer`` (built inside :func:`simulated_tensors`) and count its memory and FLOPs.

    ``replay_repeated_calls``: simulate each distinct no-grad call of the transformer once and replay its repeats
    (:class:`RepeatedCallReplay`; the same numbers, in a fraction of the time)."""
    from .trainers.stopping import StopRequest

    prepare_steady_update(trainer)
    transformer = trainer.accelerator.unwrap_model(trainer.model)

    memory = LiveBytes()
    for parameter in transformer.parameters():
        memory.track(parameter, "trained weights" if parameter.requires_grad else "frozen weights")
    for buffer in transformer.buffers():
        memory.track(buffer, "frozen weights")
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
    )
