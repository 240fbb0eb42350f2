"""What a trainer changes on the user's pipeline modules, recorded before training and undone after it.

Training freezes modules, switches them to training mode, turns on activation checkpointing, casts a full
fine-tune to fp32 master weights and LoRA weights to fp32, moves modules between devices, and
``accelerator.prepare`` patches the transformer's ``forward`` with an autocast wrapper (and marks it prepared,
so that a second ``prepare`` would return it unwrapped). After training, the user's module must carry the
trained weights and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Instance attributes ``accelerator.prepare`` sets on the module it is given: the mixed-precision wrapper of
# ``forward``, the original ``forward`` it keeps, and the mark that makes a later ``prepare`` skip the module.
_PREPARE_ATTRIBUTES = ("forward", "_original_forward", "_is_accelerate_prepared")
_MISSING = object()


@dataclass
class ModuleState:
    """The trainer-visible state of one module as found: flags per submodule and parameter, dtype, device."""

    module: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    training: list[tuple[torch.nn.Module, bool]] = field(default_factory=list)
    requires_grad: list[tuple[torch.nn.Parameter, bool, torch.dtype]] = field(default_factory=list)
    checkpointing: list[tuple[torch.nn.Module, bool, object]] = field(default_factory=list)
    attributes: dict[str, object] = field(default_factory=dict)

    @classmethod
    def capture(cls, module: torch.nn.Module) -> ModuleState:
        parameters = list(module.parameters())
        first = parameters[0] if parameters else None
        # The module's dtype is its first floating parameter's, as diffusers' ModelMixin.dtype: a bitsandbytes
        # quantized model's first parameter holds packed integers.
        floating = next((p for p in parameters if p.is_floating_point()), None)
        return cls(
            module=module,
            device=first.device if first is not None else torch.device("cpu"),
            dtype=floating.dtype if floating is not None else torch.float32,
            training=[(m, m.training) for m in module.modules()],
            requires_grad=[(p, p.requires_grad, p.dtype) for p in parameters],
            checkpointing=[
                (m, m.gradient_checkpointing, getattr(m, "_gradient_checkpointing_func", _MISSING))
                for m in module.modules()
                if hasattr(m, "gradient_checkpointing")
            ],
            attributes={name: module.__dict__.get(name, _MISSING) for name in _PREPARE_ATTRIBUTES},
        )

    def restore(self, *, device: bool) -> None:
        """Put every recorded flag back. Parameters added since (a LoRA) keep their values and flags, cast to the
        module's dtype as found, as ``load_lora_weights`` gives them; the module goes back to its device if ``device``."""
        module = self.module
        for name, value in self.attributes.items():
            module.__dict__.pop(name, None)
            if value is not _MISSING:
                module.__dict__[name] = value
        # New submodules (the LoRA layers) take the module's own mode (modules() yields the module first).
        module.train(self.training[0][1])
        for submodule, training in self.training:
            submodule.training = training
        for submodule, enabled, function in self.checkpointing:
            submodule.gradient_checkpointing = enabled
            if function is _MISSING:
                submodule.__dict__.pop("_gradient_checkpointing_func", None)
            else:
                submodule._gradient_checkpointing_func = function
        recorded = {id(p): (flag, dtype) for p, flag, dtype in self.requires_grad}
        with torch.no_grad():
            for parameter in module.parameters():
                flag, dtype = recorded.get(id(parameter), (parameter.requires_grad, self.dtype))
                if parameter.is_floating_point() and parameter.dtype != dtype:
                    parameter.data = parameter.data.to(dtype)
                parameter.requires_grad_(flag)
        if device:
            module.to(self.device)


class PipelineState:
    """The state of a pipeline's modules as found. :meth:`restore` gives the user's pipeline back: the trained
    weights in it and nothing else of the trainer; the modules that train and decode (``keep_on_device``) stay on
    the training device, every other module goes back where it was."""

    def __init__(self, modules: list[torch.nn.Module], keep_on_device: list[torch.nn.Module]):
        self.states = [ModuleState.capture(m) for m in modules]
        self.keep_on_device = {id(m) for m in keep_on_device}

    def restore(self) -> None:
        for state in self.states:
            state.restore(device=id(state.module) not in self.keep_on_device)
