"""A frozen base quantized through diffusers' own quantization configs, for a LoRA on a small card.

The transformer's frozen weights are stored in 4 or 8 bits and computed in the pipeline's dtype; the LoRA on top
stays in fp32 master weights. The rollout runs in the same quantized model. The LoRA's keys are those of the
unquantized model, so a stock bf16 pipeline loads it with ``load_lora_weights``.

    from diffusers import FluxPipeline
    from diffusers_srpo import quantization_config

    pipe = FluxPipeline.from_pretrained(
        "black-forest-labs/FLUX.1-dev", torch_dtype=torch.bfloat16, quantization_config=quantization_config("nf4")
    )

| name | backend | weights of FLUX.1-dev's transformer |
|---|---|---|
| ``nf4`` | bitsandbytes 4-bit NF4 with double quantization (QLoRA's format; needs CUDA to load) | 5.7 GiB |
| ``int8`` | torchao int8 weight-only (per-channel scales) | 11.1 GiB |
| ``float8`` | torchao float8 (e4m3) weight-only (fast on Ada / Hopper GPUs) | 11.1 GiB |

bf16 is 22.2 GiB. int8 is torchao's rather than bitsandbytes' LLM.int8: bitsandbytes computes an int8 layer
differently with and without gradient (outlier decomposition of the activations in one, a dequantized weight in
the other), so its rollout and its gradient pass would be two different models.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import sys

import torch

#: ``--quantize`` choices: name -> (backend package, what it is).
QUANTIZE_CHOICES = {
    "nf4": ("bitsandbytes", "bitsandbytes NF4 4-bit, double quantization"),
    "int8": ("torchao", "torchao int8 weight-only"),
    "float8": ("torchao", "torchao float8 weight-only"),
}
#: What to install for each backend (the package's own extra installs both).
_INSTALL = "pip install 'diffusers-srpo[quantization]'"


#: Loggers of what importing the optional backends prints, none of it about the user's run: bitsandbytes on a CPU
#: with AVX512-BF16 tries to fetch a kernel from the hub (and the ``kernels`` library warns that it is offline),
#: torchao registers pytree constants that torch 2.12+ calls deprecated, diffusers warns of torchao tensor classes
#: it no longer needs.
_IMPORT_TIME_LOGGERS = ("bitsandbytes", "kernels", "torch.utils._pytree", "diffusers.quantizers")


def import_backends_quietly() -> None:
    """Import diffusers' quantizers, which import bitsandbytes and torchao when they are installed, offline and with
    those libraries' import-time warnings silenced (and only those: the loggers' levels and the hub's offline flag
    are restored after the import), so that importing this package never reaches the network and a command's error
    stays one line. bitsandbytes' CPU backend fetches an optional kernel from the hub on import, on CPUs with
    AVX512-BF16; offline, it keeps its own."""
    if "diffusers.quantizers" in sys.modules:
        return
    from huggingface_hub import constants

    loggers = [logging.getLogger(name) for name in _IMPORT_TIME_LOGGERS]
    levels = [logger.level for logger in loggers]
    with contextlib.ExitStack() as restore:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(logging.ERROR)
            restore.callback(logger.setLevel, level)
        restore.callback(setattr, constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)
        constants.HF_HUB_OFFLINE = True
        import diffusers.quantizers  # noqa: F401


# On import, so that the package's own imports (its rewards and trainers import diffusers' pipelines) come after.
import_backends_quietly()


def check_quantize(name: str | None) -> None:
    """Refuse, in one line, an unknown ``name`` or one whose backend is not installed (``None``: no quantization)."""
    if name is None:
        return
    if name not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)} (or none), got {name!r}")
    package = QUANTIZE_CHOICES[name][0]
    if importlib.util.find_spec(package) is None:
        raise ValueError(f"quantize={name!r} needs {package}, which is not installed: {_INSTALL}")


def transformer_quantization_config(name: str, compute_dtype: torch.dtype = torch.bfloat16):
    """The diffusers quantization config of one model for ``name`` (see the module's table)."""
    check_quantize(name)
    if name == "nf4":
        from diffusers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    from diffusers import TorchAoConfig
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    # diffusers 0.42 refuses torchao's string spellings ("int8_weight_only"): it takes the config objects.
    return TorchAoConfig(Int8WeightOnlyConfig() if name == "int8" else Float8WeightOnlyConfig())


def quantization_config(name: str, compute_dtype: torch.dtype = torch.bfloat16, components=("transformer",)):
    """A ``PipelineQuantizationConfig`` that loads ``components`` (the transformer by default) quantized as ``name``;
    pass it as ``quantization_config=`` to a pipeline's ``from_pretrained``.

    The text encoders need no quantization for training: every prompt is encoded once, before the transformer comes
    to the device, and the encoders then leave it."""
    from diffusers import PipelineQuantizationConfig

    if isinstance(components, str):
        components = (components,)
    config = transformer_quantization_config(name, compute_dtype)
    return PipelineQuantizationConfig(quant_mapping={component: config for component in components})


def quantization_of(module: torch.nn.Module) -> str | None:
    """How ``module``'s weights are quantized, in words (``None`` if they are not): read from the layers themselves,
    so that a model quantized after loading (torchao's ``quantize_``, a LoRA wrapping the layers) is seen too."""
    for layer in module.modules():
        if getattr(layer, "simulated_format", None):  # the scale simulator's stand-in (diffusers_srpo.simulation)
            return f"{layer.simulated_format} (simulated)"
        kind = type(layer).__module__
        if kind.startswith("bitsandbytes") and type(layer).__name__ == "Linear4bit":
            return f"bitsandbytes {getattr(layer.weight, 'quant_type', '4-bit')} 4-bit"
        if kind.startswith("bitsandbytes") and type(layer).__name__ == "Linear8bitLt":
            return "bitsandbytes LLM.int8"
        for parameter in layer.parameters(recurse=False):
            if type(parameter).__module__.startswith("torchao") or type(parameter.data).__module__.startswith("torchao"):
                return f"torchao {type(parameter.data).__name__}"
    return None


def quantize_in_memory(model: torch.nn.Module, name: str, compute_dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """Quantize ``model``'s linear layers in place as ``name``, as diffusers' ``from_pretrained`` with
    :func:`transformer_quantization_config` does while loading (the same layers, classes and parameters), for a
    model that exists only in memory: random weights of a benchmark, a model built in code. Loading from files,
    use ``from_pretrained(..., quantization_config=quantization_config(name))``: it never holds the whole model
    unquantized. The layers stay on their device."""
    check_quantize(name)
    config = transformer_quantization_config(name, compute_dtype)
    if name != "nf4":
        from torchao.quantization import quantize_

        quantize_(model, config.quant_type)  # every nn.Linear, as diffusers' TorchAoHfQuantizer
        return model
    import bitsandbytes as bnb
    from diffusers.quantizers.bitsandbytes.utils import replace_with_bnb_linear

    originals = {n: (m.weight.data, m.bias) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    if any(weight.device.type == "cpu" for weight, _ in originals.values()):
        _repair_cpu_dequantize_4bit()
    replace_with_bnb_linear(model, modules_to_not_convert=[], quantization_config=config)
    for layer_name, layer in model.named_modules():
        if not isinstance(layer, bnb.nn.Linear4bit):
            continue
        weight, bias = originals[layer_name]
        # diffusers' create_quantized_param: the empty layer's Params4bit settings, quantized on moving to the device.
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, **layer.weight.__dict__).to(weight.device)
        if bias is not None:
            layer.bias = torch.nn.Parameter(bias.data, requires_grad=False)
        if weight.device.type == "cpu":
            # bitsandbytes repacks a CPU layer's weight on its first forward without gradient on CPUs with
            # AVX512-BF16, after which no gradient flows through it: keep the layout that trains.
            layer.support_avx512bf16_for_cpu = False
    return model


def _repair_cpu_dequantize_4bit() -> None:
    """Make bitsandbytes decode 4-bit CPU weights right, if its native CPU kernel does not.

    bitsandbytes 0.50's native CPU ``dequantize_4bit`` reads a weight's block scales as if the blocks of 64 tiled
    each row, while quantization cuts the flattened weight into blocks: for a layer whose in_features is not a
    multiple of 64 every weight after the first block row comes back with another block's scale (a (96, 96) weight
    has a relative error of 0.28 instead of NF4's 0.09). CUDA uses other kernels, and FLUX.1-dev's in_features are
    all multiples of 64; the toy world's and the tests' small models are not. A round trip of such a weight shows
    whether the kernel is wrong; if so, bitsandbytes' own generic implementation (which decodes the flat blocks;
    run eagerly, uncompiled) becomes the CPU kernel of ``bitsandbytes::dequantize_4bit``."""
    import bitsandbytes.functional as F

    weight = torch.randn(96, 96, generator=torch.Generator().manual_seed(0))
    packed, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    if (F.dequantize_4bit(packed, state) - weight).norm() < 0.15 * weight.norm():
        return
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    decode = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)  # not torch.compile'd

    def dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype):
        if A.dtype != torch.uint8:
            A = A.view(torch.uint8)
        return decode(A.reshape(-1), absmax, _get_4bit_code(quant_type, A.device), blocksize, shape, dtype)

    torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu", dequantize_4bit)
