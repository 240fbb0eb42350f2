"""Turn a fully fine-tuned transformer (FLUX, FLUX.2, Qwen-Image, SD3) into a LoRA: truncated SVD of the weight
differences.

SRPO's official release (and any full fine-tune) ships the whole transformer. A LoRA of the change is
a fraction of the size and can be stacked, scaled and unloaded with the stock diffusers API. For every
``nn.Linear`` layer, ``delta = W_tuned - W_base`` is replaced by its best rank-``r`` approximation
``B @ A`` (Eckart-Young); the rest of the change (biases, norm scales, embeddings) cannot ride in a
LoRA and is reported instead of being dropped silently::

    base = FluxTransformer2DModel.from_pretrained("black-forest-labs/FLUX.1-dev", subfolder="transformer")
    tuned = load_transformer_state_dict("srpo/diffusion_pytorch_model.safetensors", base=base)
    extraction = extract_lora(base, tuned, rank=64, device="cuda")
    save_lora("srpo-lora", extraction)  # FluxPipeline.load_lora_weights("srpo-lora") reads it (the default family)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "LayerReport",
    "LoraExtraction",
    "UncapturedChange",
    "extract_lora",
    "load_transformer_state_dict",
    "save_lora",
]

# Matrices up to this size are decomposed in float64: cheap there, and the reported error of an exact
# extraction is then ~1e-15 rather than float32 rounding noise. FLUX.1's layers (3072 x 3072 and up) exceed it.
_FLOAT64_SVD_MAX_ELEMENTS = 2**22

# How many missing, unexpected or mis-shaped keys an error message names.
_KEYS_SHOWN = 5

# The weight files of a diffusers model folder, in the order diffusers itself prefers them.
_DIFFUSERS_WEIGHT_FILES = (
    ("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.safetensors"),
    ("diffusion_pytorch_model.bin.index.json", "diffusion_pytorch_model.bin"),
)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


@dataclass(frozen=True)
class LayerReport:
    """How well the LoRA of one ``nn.Linear`` layer reproduces that layer's weight change."""

    rank: int  # the rank used: the requested one, clipped to min(out_features, in_features)
    relative_error: float  # ||delta - B @ A||_F / ||delta||_F, with A and B in the dtype they are stored in
    energy_kept: float  # sum of the kept sigma^2 over the sum of all sigma^2
    relative_change: float  # ||delta||_F / ||W_base||_F: how much fine-tuning moved the layer


@dataclass(frozen=True)
class UncapturedChange:
    """A change of one state-dict entry that the LoRA does not carry."""

    reason: str  # "Linear bias", "not a Linear weight" or "Linear weight outside target_modules"
    change_norm: float  # ||tuned - base||_F
    relative_change: float  # change_norm / ||base||_F; inf where the base entry is all zeros


@dataclass
class LoraExtraction:
    """A LoRA extracted by :func:`extract_lora`, with what it captures and what it leaves out.

    ``state_dict`` has peft-format keys (``transformer_blocks.0.attn.to_q.lora_A.weight``), as
    ``peft.get_peft_model_state_dict`` gives them, on the CPU. ``alpha == rank``, so the LoRA is applied
    at scale 1: ``W_base + B @ A`` approximates ``W_tuned``.
    """

    state_dict: dict[str, torch.Tensor]
    rank: int
    alpha: int
    layers: dict[str, LayerReport]  # module name -> report, for every layer in state_dict
    unchanged_layers: list[str]  # targeted Linear layers whose weight did not change at all
    uncaptured: dict[str, UncapturedChange]  # state-dict key -> change the LoRA does not carry

    @property
    def clipped_layers(self) -> list[str]:
        """Layers too small for the requested rank: their LoRA has rank min(out_features, in_features)."""
        return [name for name, layer in self.layers.items() if layer.rank < self.rank]

    def adapter_metadata(self) -> dict:
        """The peft ``LoraConfig.to_dict()`` that ``load_lora_weights`` rebuilds the adapter from.

        diffusers uses this metadata verbatim instead of inferring the config, so it must be exact: the
        target modules are the extracted layers by full name (an unchanged layer gets no adapter), and a
        clipped layer gets its own rank and alpha so that its scale stays 1.
        """
        from peft import LoraConfig

        # "^" anchors the pattern to the whole module name, as diffusers writes rank patterns.
        clipped = {f"^{name}": self.layers[name].rank for name in self.clipped_layers}
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            target_modules=sorted(self.layers),
            rank_pattern=clipped,
            alpha_pattern=dict(clipped),
        ).to_dict()


def extract_lora(
    base: nn.Module,
    tuned_state_dict: Mapping[str, torch.Tensor],
    rank: int,
    target_modules: Sequence[str] | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> LoraExtraction:
    """Extract a rank-``rank`` LoRA of ``tuned_state_dict - base.state_dict()`` by truncated SVD.

    Args:
        base: the model that was fine-tuned (e.g. FLUX.1-dev's ``FluxTransformer2DModel``); not modified.
        tuned_state_dict: the fine-tuned weights, with exactly the keys and shapes of ``base.state_dict()``.
        rank: the LoRA rank, a positive int. A layer with min(out_features, in_features) below it gets a
            LoRA of that smaller rank, which reproduces its change exactly; see ``clipped_layers``.
        target_modules: the ``nn.Linear`` layers to extract, matched as peft matches them (a full module
            name, or a suffix after a dot such as ``"attn.to_q"``); ``None`` takes every ``nn.Linear``.
        device: where the SVDs run, one layer at a time (``"cuda"`` makes FLUX-sized layers fast);
            defaults to the device of each base weight.
        dtype: dtype of the stored LoRA factors; defaults to each tuned weight's dtype.

    Layers whose weight did not change are skipped and listed in ``unchanged_layers``. Every other
    change (biases, norms, embeddings, layers outside ``target_modules``) is listed in ``uncaptured``.

    Raises:
        ValueError: for a bad ``rank``, a ``target_modules`` entry matching no ``nn.Linear`` layer, or keys
            and shapes that differ from the base model's (checked before any SVD).
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    base_state = base.state_dict()
    _check_state_dict_matches(base_state, tuned_state_dict, source="tuned_state_dict")
    linear_names = [name for name, module in base.named_modules() if isinstance(module, nn.Linear)]
    targeted = _select_targets(linear_names, target_modules)

    lora_state_dict: dict[str, torch.Tensor] = {}
    layers: dict[str, LayerReport] = {}
    unchanged_layers: list[str] = []
    with torch.no_grad():
        for name in targeted:
            base_weight = base_state[f"{name}.weight"]
            tuned_weight = tuned_state_dict[f"{name}.weight"]
            work_device = torch.device(device) if device is not None else base_weight.device
            delta = tuned_weight.to(work_device, torch.float32) - base_weight.to(work_device, torch.float32)
            if not torch.any(delta):
                unchanged_layers.append(name)
                continue
            lora_A, lora_B, layers[name] = _factorize(delta, rank, base_weight, dtype or tuned_weight.dtype)
            lora_state_dict[f"{name}.lora_A.weight"] = lora_A
            lora_state_dict[f"{name}.lora_B.weight"] = lora_B

        captured_or_unchanged = {f"{name}.weight" for name in targeted}
        linear_weights = {f"{name}.weight" for name in linear_names}
        linear_biases = {f"{name}.bias" for name in linear_names}
        uncaptured: dict[str, UncapturedChange] = {}
        for key, base_value in base_state.items():
            if key in captured_or_unchanged:
                continue
            change = tuned_state_dict[key].to(torch.float32) - base_value.to(torch.float32)
            change_norm = torch.linalg.vector_norm(change).item()
            if change_norm == 0:
                continue
            if key in linear_biases:
                reason = "Linear bias"
            elif key in linear_weights:
                reason = "Linear weight outside target_modules"
            else:
                reason = "not a Linear weight"
            base_norm = torch.linalg.vector_norm(base_value.to(torch.float32)).item()
            relative_change = change_norm / base_norm if base_norm > 0 else math.inf
            uncaptured[key] = UncapturedChange(reason, change_norm, relative_change)

    return LoraExtraction(lora_state_dict, rank, rank, layers, unchanged_layers, uncaptured)


def _factorize(
    delta: torch.Tensor, rank: int, base_weight: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, LayerReport]:
    """``(lora_A, lora_B, report)`` with ``lora_B @ lora_A`` the best rank-``rank`` approximation of ``delta``."""
    use_float64 = delta.numel() <= _FLOAT64_SVD_MAX_ELEMENTS and delta.device.type != "mps"  # MPS has no float64
    delta = delta.to(torch.float64 if use_float64 else torch.float32)
    left, singular_values, right = torch.linalg.svd(delta, full_matrices=False)
    layer_rank = min(rank, singular_values.numel())
    # sqrt(S) on both sides keeps A and B at the same scale, which suits low-precision storage.
    sqrt_kept = singular_values[:layer_rank].sqrt()
    lora_B = (left[:, :layer_rank] * sqrt_kept).to(dtype)
    lora_A = (sqrt_kept[:, None] * right[:layer_rank]).to(dtype)

    delta_norm = torch.linalg.vector_norm(delta)
    residual = delta - lora_B.to(delta.dtype) @ lora_A.to(delta.dtype)
    energy = singular_values.square()
    report = LayerReport(
        rank=layer_rank,
        relative_error=(torch.linalg.vector_norm(residual) / delta_norm).item(),
        energy_kept=(energy[:layer_rank].sum() / energy.sum()).item(),
        relative_change=(delta_norm / torch.linalg.vector_norm(base_weight.to(delta))).item(),
    )
    return lora_A.cpu().contiguous(), lora_B.cpu().contiguous(), report


def _select_targets(linear_names: list[str], target_modules: Sequence[str] | None) -> list[str]:
    if target_modules is None:
        return linear_names
    if isinstance(target_modules, str):
        # A bare string would be iterated character by character.
        target_modules = [target_modules]
    matched = [name for name in linear_names if any(_module_matches(name, t) for t in target_modules)]
    unmatched = [t for t in target_modules if not any(_module_matches(name, t) for name in linear_names)]
    if unmatched:
        raise ValueError(f"target_modules {unmatched} match no nn.Linear layer of the base model")
    return matched


def _module_matches(name: str, target: str) -> bool:
    # peft's rule for a list of target_modules, so the selection here is the one peft would make.
    return name == target or name.endswith(f".{target}")


def _check_state_dict_matches(
    base_state: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor], source: str
) -> None:
    missing = [key for key in base_state if key not in state_dict]
    unexpected = [key for key in state_dict if key not in base_state]
    if missing or unexpected:
        raise ValueError(
            f"{source}: keys do not match the base transformer's: {len(missing)} missing "
            f"{missing[:_KEYS_SHOWN]}, {len(unexpected)} unexpected {unexpected[:_KEYS_SHOWN]} "
            "(expected the diffusers-format state dict of the base transformer's class)"
        )
    mismatched = [
        f"{key} {tuple(state_dict[key].shape)} vs {tuple(value.shape)}"
        for key, value in base_state.items()
        if tuple(state_dict[key].shape) != tuple(value.shape)
    ]
    if mismatched:
        raise ValueError(
            f"{source}: {len(mismatched)} tensors differ in shape from the base transformer's (tuned vs base): "
            + "; ".join(mismatched[:_KEYS_SHOWN])
        )


def load_transformer_state_dict(path: str | os.PathLike, base: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Read a whole transformer's weights, on the CPU, without executing any pickled code.

    ``path`` is a ``.safetensors`` file (e.g. SRPO's ``diffusion_pytorch_model.safetensors``), a ``.bin``,
    ``.pt`` or ``.pth`` file (read with ``torch.load(weights_only=True)``), or a folder written by
    ``save_pretrained``: a model folder with ``diffusion_pytorch_model.safetensors`` or its sharded
    ``.index.json``, or a pipeline folder whose ``transformer/`` subfolder is one.

    With ``base``, the keys and shapes are checked against ``base.state_dict()``.

    Raises:
        FileNotFoundError: ``path`` (or a shard its index names) does not exist, or a folder holds no weights.
        ValueError: an unsupported file type, a file that is not a flat dict of tensors, or keys or shapes that
            differ from ``base``'s. Every message names ``path``.
    """
    state_dict: dict[str, torch.Tensor] = {}
    for file in transformer_weight_files(path):
        state_dict.update(_load_weight_file(file))
    if base is not None:
        _check_state_dict_matches(base.state_dict(), state_dict, source=path)
    return state_dict


def transformer_weight_files(path: str | os.PathLike) -> list[str]:
    """The weight files :func:`load_transformer_state_dict` reads for ``path``, found without reading them.

    Raises ``FileNotFoundError`` as that function does, and ``ValueError`` for a file of an unsupported type.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    if not os.path.isdir(path):
        if not path.endswith((".safetensors", *_PICKLE_SUFFIXES)):
            raise ValueError(f"{path}: unsupported weight file; expected .safetensors, or {', '.join(_PICKLE_SUFFIXES)}")
        return [path]
    return _weight_files_in(path)


def _weight_files_in(folder: str) -> list[str]:
    for model_folder in (folder, os.path.join(folder, "transformer")):
        for index_name, single_name in _DIFFUSERS_WEIGHT_FILES:
            index_path = os.path.join(model_folder, index_name)
            if os.path.isfile(index_path):
                with open(index_path) as f:
                    shard_names = sorted(set(json.load(f)["weight_map"].values()))
                shards = [os.path.join(model_folder, name) for name in shard_names]
                for shard in shards:
                    if not os.path.isfile(shard):
                        raise FileNotFoundError(f"{shard}: shard named by {index_path} does not exist")
                return shards
            single_path = os.path.join(model_folder, single_name)
            if os.path.isfile(single_path):
                return [single_path]
    raise FileNotFoundError(
        f"{folder}: no diffusers transformer weights (diffusion_pytorch_model.safetensors or its .index.json "
        "shards) in the folder or in its transformer/ subfolder"
    )


def _load_weight_file(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    if path.endswith(_PICKLE_SUFFIXES):
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
            raise ValueError(f"{path}: expected a flat dict of tensors, got a {type(state_dict).__name__}")
        return state_dict
    raise ValueError(f"{path}: unsupported weight file; expected .safetensors, or {', '.join(_PICKLE_SUFFIXES)}")


def save_lora(directory: str | os.PathLike, extraction: LoraExtraction, pipeline_class_name: str = "FluxPipeline") -> str:
    """Write ``extraction`` as ``<directory>/pytorch_lora_weights.safetensors``; returns that file's path.

    The file is what ``<pipeline_class_name>.save_lora_weights`` writes (keys prefixed ``transformer.``), with the
    adapter metadata from :meth:`LoraExtraction.adapter_metadata`, so that pipeline's ``load_lora_weights(directory)``
    loads it with the extracted ranks at scale 1.
    """
    import diffusers
    from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE

    if not extraction.state_dict:
        raise ValueError("nothing to save: no targeted Linear layer differs from the base model")
    directory = os.fspath(directory)
    getattr(diffusers, pipeline_class_name).save_lora_weights(
        directory,
        transformer_lora_layers=extraction.state_dict,
        transformer_lora_adapter_metadata=extraction.adapter_metadata(),
    )
    return os.path.join(directory, LORA_WEIGHT_NAME_SAFE)
