"""The ``diffusers-srpo`` command line: ``train``, ``sample``, ``evaluate``, ``demo`` and ``extract-lora``.

Every option comes from a dataclass field (for ``train``, the config class of ``--method``: ``SRPOConfig`` by
default), so the help text of a field is its ``--help`` line. Bad command lines stop with one
``diffusers-srpo <command>: error: ...`` line and a non-zero exit before anything is loaded or written.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import signal
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from .trainers import METHODS, trainer_class_for
from .trainers.config import _help, check_field_values

PROG = "diffusers-srpo"
DTYPE_NAMES = ("bfloat16", "float16", "float32")


class UsageError(Exception):
    """A command line or config that cannot run: reported as one line, exit status 2, nothing loaded or written."""


class SetupError(Exception):
    """A model, reward or trainer that fails to load or to check out: reported as one line, exit status 1."""


class StoppedError(Exception):
    """A run that stopped early and said where its checkpoint is: one line, exit status ``status``."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class _Parser(HfArgumentParser):
    def error(self, message: str):
        """One line instead of argparse's usage block: the message and where help is."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ----------------------------------------------------------------------------------------------- arguments
@dataclass
class TrainArguments:
    """What ``train`` needs beside the method's config: the model, the reward and the config file."""

    config: str | None = field(
        default=None,
        metadata=_help("YAML or JSON file of settings (any option below, by its name); options on the command line win."),
    )
    model: str = field(
        default="black-forest-labs/FLUX.1-dev",
        metadata=_help("Pipeline to align, a hub id or a local folder: FLUX.1, FLUX.2, Qwen-Image or SD3 / SD3.5."),
    )
    reward: str = field(
        default="hpsv2:v2.1",
        metadata=_help(
            "Reward as NAME[:SOURCE]: hpsv2[:checkpoint.pt|v2.1|v2.0], pickscore[:folder_or_id], clip:name_or_path."
        ),
    )
    torch_dtype: str = field(
        default="bfloat16", metadata=_help(f"Weight dtype of the frozen modules: {', '.join(DTYPE_NAMES)}.")
    )
    quantize: str | None = field(
        default=None,
        metadata=_help(
            "Load the frozen transformer quantized, with a LoRA on top (one 24 GB GPU for FLUX.1-dev): nf4 "
            "(bitsandbytes 4-bit, needs CUDA), int8 or float8 (torchao weight-only); computed in --torch_dtype. "
            "Needs pip install 'diffusers-srpo[quantization]'."
        ),
    )


_QUANTIZE_TO_SAMPLE = (
    "Load the transformer quantized: nf4 (bitsandbytes 4-bit, needs CUDA), int8 or float8 (torchao weight-only), "
    "e.g. to sample on the card a --quantize LoRA was trained on."
)


@dataclass
class SampleArguments:
    model: str = field(
        default="black-forest-labs/FLUX.1-dev",
        metadata=_help("Pipeline to sample, a hub id or a local folder: FLUX.1, FLUX.2, Qwen-Image or SD3 / SD3.5."),
    )
    prompt: list[str] | None = field(default=None, metadata=_help("One or more prompts."))
    prompt_file: str | None = field(default=None, metadata=_help("Prompts from a .txt (one a line) or .jsonl file."))
    lora: list[str] | None = field(
        default=None,
        metadata=_help("LoRA folders (or hub ids) to load, each optionally as PATH:SCALE (scale 1.0 by default)."),
    )
    output_dir: str = field(default="samples", metadata=_help("Folder for the PNGs and grid.png."))
    num_inference_steps: int = field(default=28, metadata=_help("Sampling steps."))
    guidance_scale: float | None = field(
        default=None,
        metadata=_help(
            "Distilled guidance (FLUX.1, FLUX.2 dev) or classifier-free guidance scale (SD3, Qwen-Image, FLUX.2 "
            "klein); default the pipeline's own."
        ),
    )
    negative_prompt: str | None = field(
        default=None,
        metadata=_help("Negative prompt of classifier-free guidance (SD3, Qwen-Image, FLUX.2 klein); default ''."),
    )
    height: int = field(default=1024, metadata=_help("Image height in pixels."))
    width: int = field(default=1024, metadata=_help("Image width in pixels."))
    num_images_per_prompt: int = field(default=1, metadata=_help("Images per prompt."))
    seed: int = field(default=0, metadata=_help("Seed of the noise (the same for every LoRA choice)."))
    max_sequence_length: int | None = field(
        default=None, metadata=_help("Token length of the prompt encoding; default the pipeline's own.")
    )
    torch_dtype: str = field(default="bfloat16", metadata=_help(f"Weight dtype: {', '.join(DTYPE_NAMES)}."))
    quantize: str | None = field(default=None, metadata=_help(_QUANTIZE_TO_SAMPLE))
    device: str | None = field(default=None, metadata=_help("Device; default cuda when available, else cpu."))


@dataclass
class EvaluateArguments:
    model: str = field(
        default="black-forest-labs/FLUX.1-dev",
        metadata=_help(
            "Base pipeline, a hub id or a local folder: FLUX.1, FLUX.2, Qwen-Image or SD3 / SD3.5. The toy world's "
            "shipped pipeline folder (diffusers_srpo/toyworld/weights/pipeline) also gets the oracle metrics."
        ),
    )
    lora: list[str] | None = field(
        default=None,
        metadata=_help(
            "A LoRA (folder, file or hub id) to compare with the base, as PATH[:SCALE] (scale 1.0 by default); repeat "
            "the option, or list several, for several LoRAs: each is a variant beside the base.",
            action="extend",
        ),
    )
    prompt_file: str | None = field(default=None, metadata=_help("Prompts from a .txt (one a line) or .jsonl file."))
    reward: list[str] | None = field(
        default=None,
        metadata=_help(
            "Rewards that score every image, as NAME[:SOURCE]: hpsv2[:checkpoint.pt|v2.1|v2.0], "
            "pickscore[:folder_or_id], clip:name_or_path, aesthetic:mlp_weights; several at once; default hpsv2:v2.1.",
            action="extend",
        ),
    )
    num_images_per_prompt: int = field(
        default=1, metadata=_help("Images per prompt and variant, from seeds seed, seed + 1, ...")
    )
    seed: int = field(
        default=0, metadata=_help("First seed; image (prompt, seed) starts from the same noise in every variant.")
    )
    height: int = field(default=1024, metadata=_help("Image height in pixels."))
    width: int = field(default=1024, metadata=_help("Image width in pixels."))
    num_inference_steps: int = field(default=28, metadata=_help("Sampling steps."))
    guidance_scale: float | None = field(
        default=None,
        metadata=_help(
            "Distilled guidance (FLUX.1, FLUX.2 dev) or classifier-free guidance scale (SD3, Qwen-Image, FLUX.2 "
            "klein); default the pipeline's own."
        ),
    )
    negative_prompt: str | None = field(
        default=None,
        metadata=_help("Negative prompt of classifier-free guidance (SD3, Qwen-Image, FLUX.2 klein); default ''."),
    )
    max_sequence_length: int | None = field(
        default=None, metadata=_help("Token length of the prompt encoding; default the pipeline's own.")
    )
    torch_dtype: str = field(default="bfloat16", metadata=_help(f"Weight dtype: {', '.join(DTYPE_NAMES)}."))
    batch_size: int = field(default=4, metadata=_help("Images per pipeline call and per reward call."))
    quantize: str | None = field(default=None, metadata=_help(_QUANTIZE_TO_SAMPLE))
    device: str | None = field(default=None, metadata=_help("Device; default cuda when available, else cpu."))
    output_dir: str = field(
        default="evaluation",
        metadata=_help(
            "Folder for images/, scores.jsonl, summary.json, summary.md and grid.png; a rerun with the same settings "
            "resumes there."
        ),
    )
    overwrite_output_dir: bool = field(
        default=False, metadata=_help("Write over an output_dir that holds another run or another evaluation.")
    )


@dataclass
class DemoArguments:
    output_dir: str = field(default="srpo-demo", metadata=_help("Folder for the LoRA, the grids, the curves and metrics."))
    max_train_steps: int = field(default=10, metadata=_help("SRPO updates."))
    learning_rate: float = field(default=3e-3, metadata=_help("AdamW learning rate of the LoRA."))
    train_batch_size: int = field(default=4, metadata=_help("Content prompts per update."))
    positive_word: str = field(default="bright", metadata=_help("SRP's positive control word: a toy-world style."))
    negative_word: str = field(default="dark", metadata=_help("SRP's negative control word: a toy-world style."))
    seed: int = field(default=0, metadata=_help("Seed of the training and of the evaluation noise."))
    overwrite_output_dir: bool = field(default=False, metadata=_help("Write over an output_dir that holds files."))


@dataclass
class ExtractLoraArguments:
    base: str = field(
        default="black-forest-labs/FLUX.1-dev",
        metadata=_help("The base model: a pipeline folder or hub id (of a supported family), or a transformer folder."),
    )
    tuned: str | None = field(
        default=None,
        metadata=_help("The fine-tuned transformer: one .safetensors file, or a (pipeline or transformer) folder."),
    )
    rank: int = field(default=64, metadata=_help("Rank of the extracted LoRA."))
    output_dir: str = field(default="extracted-lora", metadata=_help("Folder for the LoRA and its error report."))
    device: str | None = field(default=None, metadata=_help("Device of the SVDs; default cuda when available."))


# ----------------------------------------------------------------------------------------------- shared checks
def _torch_dtype(name: str):
    import torch

    if name not in DTYPE_NAMES:
        raise UsageError(f"--torch_dtype must be one of {', '.join(DTYPE_NAMES)}, got {name!r}")
    return getattr(torch, name)


def _pipeline_from_pretrained(model: str, dtype, quantize: str | None = None):
    """``DiffusionPipeline.from_pretrained``, with the transformer quantized as ``quantize`` if given."""
    from diffusers import DiffusionPipeline

    from .quantization import quantization_config

    quantized = {"quantization_config": quantization_config(quantize, dtype)} if quantize else {}
    return DiffusionPipeline.from_pretrained(model, torch_dtype=dtype, **quantized)


def _checked_quantize(name: str | None) -> str | None:
    from .quantization import check_quantize

    try:
        check_quantize(name)
    except ValueError as error:
        raise UsageError(str(error)) from None
    return name


def _default_device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def _checked_device(device: str | None) -> str:
    """``--device`` (or the default) as a device this machine has."""
    import torch

    name = _default_device(device)
    try:
        parsed = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device name; expected e.g. cpu, cuda or cuda:1") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name!r}: CUDA is not available on this machine; use --device cpu")
    if parsed.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name!r}: expected cpu or cuda")
    return name


def _check_model_source(name: str, option: str, *, transformer_folder_ok: bool = False, negative_prompt=None):
    """A local pipeline folder (``model_index.json``, of a supported pipeline class; or a transformer folder with
    ``config.json`` where ``transformer_folder_ok``) or a hub id ``owner/name``; checked before anything is loaded.
    A ``negative_prompt`` for a local pipeline without classifier-free guidance is refused here too (a hub id's
    family is known once it has loaded)."""
    from .models import adapter_class_for_pipeline, supported_pipelines
    from .rewards.checkpoints import looks_like_hub_id

    if os.path.isdir(name):
        markers = ["model_index.json"] + (["config.json"] if transformer_folder_ok else [])
        if not any(os.path.isfile(os.path.join(name, marker)) for marker in markers):
            raise UsageError(f"{option} {name!r} is a folder without {' or '.join(markers)}: not a diffusers model folder")
        index = os.path.join(name, "model_index.json")
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    class_name = json.load(f).get("_class_name")
            except (OSError, ValueError, AttributeError):
                raise UsageError(f"{option} {name!r}: model_index.json is not a readable JSON object") from None
            if class_name is None:
                raise UsageError(f"{option} {name!r}: model_index.json names no pipeline class (_class_name)")
            family = adapter_class_for_pipeline(class_name)
            if family is None:
                raise UsageError(f"{option} {name!r} is a {class_name}; supported pipelines: {supported_pipelines()}")
            if negative_prompt is not None and family.guidance_kind != "cfg":
                raise UsageError(
                    f"--negative_prompt is for classifier-free guidance; {option} {name!r} is a {class_name}, which "
                    "uses distilled guidance"
                )
    elif os.path.exists(name):
        raise UsageError(f"{option} {name!r} is a file; expected a diffusers model folder or a hub id 'owner/name'")
    elif not looks_like_hub_id(name):
        raise UsageError(f"{option} {name!r} is neither a local folder nor a hub id 'owner/name'")


def _safetensors_keys(path: str, what: str) -> list[str]:
    """The tensor names of a safetensors file, read from its header only; one line if it is not one."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    except (OSError, SafetensorError) as error:
        raise UsageError(f"{what} {path!r} is not a readable .safetensors file ({error})") from None


def _check_lora_source(path: str) -> None:
    """A LoRA file, or a folder holding the one ``load_lora_weights`` reads, with LoRA weights in it; or a hub id."""
    from .rewards.checkpoints import looks_like_hub_id
    from .trainers.base import LORA_WEIGHT_NAME

    if not os.path.exists(path):
        if looks_like_hub_id(path):
            return
        raise UsageError(f"LoRA {path!r} is neither a local folder or file nor a hub id 'owner/name'")
    weights = path
    if os.path.isdir(path):
        found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if LORA_WEIGHT_NAME in found:
            found = [LORA_WEIGHT_NAME]
        if len(found) != 1:
            raise UsageError(
                f"LoRA folder {path!r} holds {len(found)} .safetensors files; expected {LORA_WEIGHT_NAME} (or one file)"
            )
        weights = os.path.join(path, found[0])
    keys = _safetensors_keys(weights, "LoRA")
    if not any("lora" in key for key in keys):
        raise UsageError(f"LoRA {weights!r} holds no LoRA weights (none of its {len(keys)} tensor names has 'lora')")


def _read_config_file(path: str) -> dict:
    """The mapping a YAML or JSON settings file holds."""
    import yaml

    if not os.path.isfile(path):
        raise UsageError(f"config file {path!r} does not exist (expected a .yaml, .yml or .json file)")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        if path.endswith((".yaml", ".yml")):
            values = yaml.safe_load(text)
        elif path.endswith(".json"):
            values = json.loads(text)
        else:
            raise UsageError(f"config file {path!r} must end in .yaml, .yml or .json")
    except (ValueError, yaml.YAMLError) as error:  # JSON errors are ValueErrors, YAML's are not
        reason = " ".join(str(error).split())
        raise UsageError(f"config file {path!r} cannot be read: {reason}") from None
    values = values or {}
    if not isinstance(values, dict):
        raise UsageError(f"config file {path!r} must hold a mapping of option names to values")
    return values


def _config_file_values(path: str, parser: argparse.ArgumentParser) -> dict:
    """The settings of a YAML or JSON file, typed as the options they stand for; unknown names are errors."""
    values = _read_config_file(path)
    actions = {action.dest: action for action in parser._actions}
    unknown = sorted(set(values) - set(actions) | ({"config"} & set(values)))
    if unknown:
        raise UsageError(f"config file {path!r} has unknown settings: {', '.join(unknown)}")
    typed = {}
    for name, value in values.items():
        convert = actions[name].type
        # YAML reads 1e-4 as a string; the option's own type gives it the meaning the command line would.
        if isinstance(value, str) and convert not in (None, str):
            try:
                value = convert(value)
            except (TypeError, ValueError):
                raise UsageError(f"config file {path!r}: {name} = {value!r} is not a valid value") from None
        typed[name] = value
    return typed


def _dataclass_from(namespace: argparse.Namespace, cls):
    return cls(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls)})


# ----------------------------------------------------------------------------------------------- train
def _train(args: argparse.Namespace) -> int:

    from .prompts import load_prompts
    from .rewards import load_reward
    from .rewards.registry import check_reward_spec
    from .trainers import NonFiniteUpdatesError, TrainingInterrupted
    from .trainers.base import check_output_dir
    from .trainers.sharding import with_accelerate_fsdp
    from .trainers.stopping import NonFiniteWeightsError

    run = _dataclass_from(args, TrainArguments)
    trainer_class = trainer_class_for(args.method)
    try:
        config = _dataclass_from(args, trainer_class.config_class)
        dtype = _torch_dtype(run.torch_dtype)
        if config.prompt_file is None:
            raise UsageError("no training prompts: pass --prompt_file (a .txt or .jsonl file)")
        load_prompts(config.prompt_file)
        check_output_dir(
            config.output_dir,
            allow_existing=bool(config.resume_from_checkpoint or config.overwrite_output_dir),
            remedy="pass --resume_from_checkpoint latest, --overwrite_output_dir, or choose another --output_dir",
        )
        config = with_accelerate_fsdp(config)  # before the checkpoint check: it is resumed with the same fsdp setting
        trainer_class.check_files(config)
        check_reward_spec(run.reward)
        _check_model_source(run.model, "--model", negative_prompt=config.negative_prompt)
        _checked_quantize(run.quantize)
        if run.quantize and not config.use_lora:
            raise UsageError(f"--quantize {run.quantize} trains a LoRA on the quantized transformer: drop --use_lora false")
        if run.quantize and config.fsdp:
            raise UsageError(f"--quantize {run.quantize} cannot be sharded: leave --fsdp off (one process per quantized copy)")
    except (TypeError, ValueError, OSError) as error:
        raise UsageError(str(error)) from None

    try:
        pipe = _pipeline_from_pretrained(run.model, dtype, run.quantize)
        trainer = trainer_class(pipe, reward=load_reward(run.reward), config=config)
    except (TypeError, ValueError, OSError) as error:
        raise SetupError(str(error)) from None
    try:
        trainer.train()
    except (TrainingInterrupted, NonFiniteUpdatesError, NonFiniteWeightsError) as stop:
        if isinstance(stop, TrainingInterrupted):
            message = f"{stop.reason}: to continue, run the same command with --resume_from_checkpoint latest"
            status = 128 + (stop.signal_number or signal.SIGTERM)
        elif isinstance(stop, NonFiniteUpdatesError):
            message, status = f"{stop} (--resume_from_checkpoint {stop.checkpoint})", 1
        else:
            message, status = str(stop), 1
        raise StoppedError(message if trainer.accelerator.is_main_process else "", status) from None
    if trainer.accelerator.is_main_process:
        what = "LoRA" if config.use_lora else "transformer"
        print(f"{config.method}: wrote the {what}, its model card and the config to {os.path.abspath(config.output_dir)}")
    return 0


# ----------------------------------------------------------------------------------------------- sample
def _parse_lora(spec: str) -> tuple[str, float]:
    """``PATH`` or ``PATH:SCALE``."""
    path, separator, scale = spec.rpartition(":")
    if separator and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", scale):
        return path, float(scale)
    return spec, 1.0


def _check_weight_shapes(transformer, shapes: dict, path: str) -> None:
    """diffusers widens a layer to fit a wider LoRA (what FLUX Control LoRAs need) and then fails in the first
    forward: a LoRA must leave every weight of the model the shape it had (``shapes``)."""
    for name, parameter in transformer.named_parameters():
        before = shapes.get(name.replace(".base_layer", ""))
        if before is not None and parameter.shape != before:
            raise ValueError(
                f"LoRA {path!r} does not fit {name.replace('.base_layer', '')}: loading it widened the weight from "
                f"{tuple(before)} to {tuple(parameter.shape)}; was it trained for another model?"
            )


def _sample(args: argparse.Namespace) -> int:
    import torch
    from diffusers.utils import make_image_grid

    from .atomic import staged_outputs
    from .prompts import load_prompts
    from .trainers.base import check_output_dir

    options = _dataclass_from(args, SampleArguments)
    try:
        check_field_values(options)
    except (TypeError, ValueError) as error:
        raise UsageError(str(error)) from None
    if not options.prompt and not options.prompt_file:
        raise UsageError("no prompt: pass --prompt TEXT [TEXT ...] or --prompt_file FILE")
    try:
        prompts = load_prompts(list(options.prompt or []) + (load_prompts(options.prompt_file) if options.prompt_file else []))
    except (ValueError, OSError) as error:
        raise UsageError(str(error)) from None
    for name in ("num_inference_steps", "height", "width", "num_images_per_prompt", "max_sequence_length"):
        if getattr(options, name) is not None and getattr(options, name) <= 0:
            raise UsageError(f"--{name} must be a positive integer, got {getattr(options, name)}")
    loras = [_parse_lora(spec) for spec in options.lora or []]
    for path, _ in loras:
        _check_lora_source(path)
    dtype = _torch_dtype(options.torch_dtype)
    device = _checked_device(options.device)
    _checked_quantize(options.quantize)
    try:
        check_output_dir(options.output_dir, allow_existing=True, remedy="")
    except OSError as error:
        raise UsageError(str(error)) from None
    _check_model_source(options.model, "--model", negative_prompt=options.negative_prompt)

    try:
        pipe, adapter, names = _load_pipeline_with_loras(
            options.model, loras, dtype, device, options.negative_prompt, options.quantize
        )
        call_settings = adapter.pipeline_call_kwargs(options.guidance_scale, options.max_sequence_length)
    except (TypeError, ValueError, OSError, RuntimeError) as error:  # a LoRA of another shape is a RuntimeError
        raise SetupError(" ".join(str(error).split())) from None
    if names:
        pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])

    images = pipe(
        prompt=prompts,
        height=options.height,
        width=options.width,
        num_inference_steps=options.num_inference_steps,
        num_images_per_prompt=options.num_images_per_prompt,
        generator=torch.Generator().manual_seed(options.seed),
        **call_settings,
    ).images
    with staged_outputs(options.output_dir) as staging:
        for index, image in enumerate(images):
            prompt = prompts[index // options.num_images_per_prompt]
            slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60] or "prompt"
            image.save(os.path.join(staging, f"{index:03d}-{slug}.png"))
        make_image_grid(images, rows=len(prompts), cols=options.num_images_per_prompt).save(os.path.join(staging, "grid.png"))
    print(f"wrote {len(images)} images and {os.path.join(options.output_dir, 'grid.png')}")
    return 0


# ----------------------------------------------------------------------------------------------- evaluate
def _load_pipeline_with_loras(
    model: str, loras: list[tuple[str, float]], dtype, device: str, negative_prompt=None, quantize=None
):
    """The stock pipeline of ``model`` on ``device`` (its transformer quantized as ``quantize``, if given) with each
    LoRA loaded as adapter ``lora0``, ``lora1``, ...; its model adapter; the adapter names. A LoRA that matches no
    module or does not fit the model is a ``ValueError``."""
    from diffusers.utils import logging as diffusers_logging

    from .models import get_model_adapter

    pipe = _pipeline_from_pretrained(model, dtype, quantize).to(device)
    adapter = get_model_adapter(pipe, negative_prompt=negative_prompt)
    names = []
    shapes = {name: parameter.shape for name, parameter in pipe.transformer.named_parameters()}
    for index, (path, _) in enumerate(loras):
        name = f"lora{index}"
        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)  # it logs a failed load before raising it
        try:
            pipe.load_lora_weights(path, adapter_name=name)
        except (RuntimeError, ValueError) as error:  # peft's missing modules; torch's shapes, a line per tensor
            reason = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line), str(error))
            message = f"LoRA {path!r} does not fit {model!r}: {reason} Was it trained for another model?"
            raise ValueError(message) from None
        finally:
            diffusers_logging.set_verbosity(verbosity)
        loaded = {adapter for adapters in pipe.get_list_adapters().values() for adapter in adapters}
        # diffusers only warns when a LoRA matches no module: a silent no-op is worse than an error here.
        if name not in loaded:
            raise ValueError(f"LoRA {path!r} matched no module of {model!r}")
        _check_weight_shapes(pipe.transformer, shapes, path)
        names.append(name)
    return pipe, adapter, names


def _evaluate(args: argparse.Namespace) -> int:
    import gc

    import torch

    from .evaluation import Evaluation
    from .prompts import load_prompts
    from .rewards.registry import check_reward_spec

    options = _dataclass_from(args, EvaluateArguments)
    try:
        check_field_values(options)
    except (TypeError, ValueError) as error:
        raise UsageError(str(error)) from None
    if options.prompt_file is None:
        raise UsageError("no prompts: pass --prompt_file FILE (a .txt file, one prompt a line, or .jsonl)")
    try:
        prompts = load_prompts(options.prompt_file)
    except (ValueError, OSError) as error:
        raise UsageError(str(error)) from None
    counts = ("num_inference_steps", "height", "width", "num_images_per_prompt", "max_sequence_length", "batch_size")
    for name in counts:
        if getattr(options, name) is not None and getattr(options, name) <= 0:
            raise UsageError(f"--{name} must be a positive integer, got {getattr(options, name)}")
    if options.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {options.seed}")
    reward_specs = options.reward or ["hpsv2:v2.1"]
    loras = [_parse_lora(spec) for spec in options.lora or []]
    for what, values in (("--reward", reward_specs), ("--lora", [f"{path}:{scale:g}" for path, scale in loras])):
        repeated = next((value for index, value in enumerate(values) if value in values[:index]), None)
        if repeated is not None:
            raise UsageError(f"{what} {repeated!r} is given twice")
    try:
        for spec in reward_specs:
            check_reward_spec(spec)
    except ValueError as error:
        raise UsageError(str(error)) from None
    for path, _ in loras:
        _check_lora_source(path)
    dtype = _torch_dtype(options.torch_dtype)
    device = _checked_device(options.device)
    _checked_quantize(options.quantize)
    _check_model_source(options.model, "--model", negative_prompt=options.negative_prompt)
    # What decides an image beside the model, the prompt, the noise and the LoRA: a resumed run must share it.
    sampler_names = ("height", "width", "num_inference_steps", "guidance_scale", "negative_prompt")
    sampler = {
        name: getattr(options, name) for name in (*sampler_names, "max_sequence_length", "torch_dtype", "quantize")
    }
    seeds = range(options.seed, options.seed + options.num_images_per_prompt)
    run = Evaluation(
        options.output_dir, options.model, prompts, seeds, loras, reward_specs, sampler, options.batch_size
    )
    try:
        run.check_output_dir(overwrite=options.overwrite_output_dir)
    except (OSError, ValueError) as error:
        raise UsageError(str(error)) from None

    pipe = None
    try:
        run.check_rewards_load()
        if run.missing_images():  # a resumed run with every image in place needs no pipeline
            pipe, adapter, adapter_names = _load_pipeline_with_loras(
                options.model, loras, dtype, device, options.negative_prompt, options.quantize
            )
            call_settings = adapter.pipeline_call_kwargs(options.guidance_scale, options.max_sequence_length)
    except (TypeError, ValueError, OSError) as error:
        raise SetupError(" ".join(str(error).split())) from None
    run.start()
    rendered = 0
    if pipe is not None:
        rendered = run.render(pipe, call_settings, adapter_names)
        del pipe, adapter  # the rewards come next, one at a time, without the pipeline beside them
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    scored = run.score(device)
    summary, report = run.write_outputs()
    print(report)
    print(
        f"{len(run.variants)} variants x {summary['images_per_variant']} images, {len(reward_specs)} reward(s): "
        f"{rendered} images rendered and {scored} scores computed now (the others were there); wrote images/, "
        f"scores.jsonl, summary.json, summary.md and grid.png to {options.output_dir}"
    )
    return 0


# ----------------------------------------------------------------------------------------------- demo
def _demo(args: argparse.Namespace) -> int:
    from .toyworld.demo import demo_config, run_demo
    from .trainers.base import check_output_dir

    options = _dataclass_from(args, DemoArguments)
    settings = dataclasses.asdict(options)  # the options are demo_config's settings, by name
    try:
        demo_config(**settings)
        check_output_dir(
            options.output_dir,
            allow_existing=options.overwrite_output_dir,
            remedy="pass --overwrite_output_dir or choose another --output_dir",
        )
    except (ValueError, OSError) as error:
        raise UsageError(str(error)) from None

    metrics = run_demo(**settings)
    before, after = metrics["before"], metrics["after"]
    fraction = f"oracle_{options.positive_word}_fraction"
    print(
        f"SRPO on the toy world ({options.positive_word!r} over {options.negative_word!r}, "
        f"{options.max_train_steps} updates, {metrics['seconds']:.0f} s): unprompted {options.positive_word} fraction "
        f"{before[fraction]:.2f} -> {after[fraction]:.2f}; colour accuracy {before['oracle_colour_accuracy']:.2f} -> "
        f"{after['oracle_colour_accuracy']:.2f}; shape accuracy {before['oracle_shape_accuracy']:.2f} -> "
        f"{after['oracle_shape_accuracy']:.2f}; SRP reward {before['evaluation_srp']:.4f} -> {after['evaluation_srp']:.4f}"
    )
    print(f"wrote the LoRA, before_after.png, curves.png and metrics.json to {options.output_dir}")
    return 0


# ----------------------------------------------------------------------------------------------- extract-lora
def _extract_lora(args: argparse.Namespace) -> int:
    from diffusers import AutoModel

    from . import lora
    from .atomic import staged_outputs
    from .models import adapter_class_for_transformer, supported_pipelines
    from .trainers.base import check_output_dir

    options = _dataclass_from(args, ExtractLoraArguments)
    if options.tuned is None:
        raise UsageError("--tuned is required: the fine-tuned transformer (a .safetensors file or a folder)")
    if not os.path.exists(options.tuned):
        raise UsageError(f"--tuned {options.tuned!r} does not exist")
    if options.rank <= 0:
        raise UsageError(f"--rank must be a positive integer, got {options.rank}")
    try:
        tuned_files = lora.transformer_weight_files(options.tuned)
    except (ValueError, OSError) as error:
        raise UsageError(f"--tuned: {error}") from None
    for file in tuned_files:
        if file.endswith(".safetensors"):
            _safetensors_keys(file, "--tuned")
    try:
        check_output_dir(options.output_dir, allow_existing=False, remedy="choose another --output_dir")
    except OSError as error:
        raise UsageError(str(error)) from None
    _check_model_source(options.base, "--base", transformer_folder_ok=True)
    device = _checked_device(options.device)

    try:
        tuned = lora.load_transformer_state_dict(options.tuned)
        # The base is compared in the tuned weights' dtype: rounding one side only would add full-rank noise.
        dtype = next(v.dtype for v in tuned.values() if v.is_floating_point())
        is_pipeline = os.path.isfile(os.path.join(options.base, "model_index.json")) or not os.path.isdir(options.base)
        base = AutoModel.from_pretrained(options.base, subfolder="transformer" if is_pipeline else None, torch_dtype=dtype)
        family = adapter_class_for_transformer(type(base).__name__)
        if family is None:
            raise ValueError(f"--base {options.base!r} has a {type(base).__name__}; supported pipelines: {supported_pipelines()}")
        extraction = lora.extract_lora(base, tuned, options.rank, device=device)
    except (TypeError, ValueError, OSError) as error:
        raise SetupError(str(error)) from None
    report = {
        "base": options.base,
        "tuned": options.tuned,
        "rank": options.rank,
        "layers": {name: dataclasses.asdict(layer) for name, layer in extraction.layers.items()},
        "unchanged_layers": extraction.unchanged_layers,
        "uncaptured": {key: dataclasses.asdict(change) for key, change in extraction.uncaptured.items()},
    }
    with staged_outputs(options.output_dir) as staging:
        weights = os.path.join(
            options.output_dir, os.path.basename(lora.save_lora(staging, extraction, family.pipeline_class_names[0]))
        )
        with open(os.path.join(staging, "extraction_report.json"), "w") as f:
            json.dump(report, f, indent=2)
    report_path = os.path.join(options.output_dir, "extraction_report.json")

    errors = sorted(((layer.relative_error, name) for name, layer in extraction.layers.items()), reverse=True)
    mean_error = sum(error for error, _ in errors) / len(errors)
    print(f"rank-{options.rank} LoRA of {len(errors)} changed Linear layers: relative error mean {mean_error:.4f}, "
          f"max {errors[0][0]:.4f}")  # fmt: skip
    print(f"{'relative error':>14} | {'energy kept':>11} | layer (worst first)")
    for error, name in errors[:10]:
        print(f"{error:>14.4f} | {extraction.layers[name].energy_kept:>11.4f} | {name}")
    if extraction.uncaptured:
        largest = max(extraction.uncaptured.items(), key=lambda item: item[1].relative_change)
        print(f"warning: {len(extraction.uncaptured)} changed entries cannot ride in a LoRA (biases, norms, ...); "
              f"largest: {largest[0]} ({largest[1].reason}, relative change {largest[1].relative_change:.3g})")  # fmt: skip
    print(f"wrote {weights} and {report_path}")
    return 0


# ----------------------------------------------------------------------------------------------- entry point
COMMANDS = {
    "train": (
        (TrainArguments,),
        _train,
        f"Train a LoRA (or full fine-tune) with SRPO or another method (--method: {', '.join(METHODS)}); "
        "works under `accelerate launch`.",
    ),
    "sample": ((SampleArguments,), _sample, "Generate images with a model and optionally LoRAs, with a grid."),
    "evaluate": (
        (EvaluateArguments,),
        _evaluate,
        "Compare a model with its LoRAs: the same prompts and noise for each, every image scored by every reward; "
        "means with bootstrap intervals, win rates against the base, a grid; resumable.",
    ),
    "demo": (
        (DemoArguments,),
        _demo,
        "The embedded offline demo: SRPO steers the shipped toy world's style on the CPU; grids, curves, metrics.",
    ),
    "extract-lora": (
        (ExtractLoraArguments,),
        _extract_lora,
        "Turn a fully fine-tuned FLUX transformer into a LoRA by truncated SVD of the weight differences.",
    ),
}


def build_parser(method: str = "srpo") -> tuple[_Parser, dict[str, _Parser]]:
    """The command line; ``train``'s options are those of ``method``'s config class."""
    parser = _Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    subparsers = {}
    for name, (dataclass_types, handler, help_text) in COMMANDS.items():
        if name == "train":
            dataclass_types = (*dataclass_types, trainer_class_for(method).config_class)
        subparser = commands.add_parser(
            name, dataclass_types=dataclass_types, help=help_text, description=help_text, prog=f"{PROG} {name}"
        )
        subparser.set_defaults(handler=handler)
        subparsers[name] = subparser
    return parser, subparsers


def _train_method(argv: list[str]) -> tuple[str, str | None]:
    """``train``'s method (from ``--method``, else the config file's ``method``, else srpo) and config file."""
    prefix = _Parser(prog=f"{PROG} train", add_help=False)
    prefix.add_argument("--config")
    prefix.add_argument("--method")
    known = prefix.parse_known_args(argv)[0]
    method = known.method
    if method is None and known.config and os.path.isfile(known.config):
        with contextlib.suppress(UsageError):
            method = _read_config_file(known.config).get("method")
    method = "srpo" if method is None else method
    if not isinstance(method, str) or method not in METHODS:
        raise UsageError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    return method, known.config


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else None
    try:
        method, config_file = _train_method(argv[1:]) if command == "train" else ("srpo", None)
        parser, subparsers = build_parser(method)
        if config_file:
            # Settings of a config file become the defaults, so that command-line options override them.
            subparsers["train"].set_defaults(**_config_file_values(config_file, subparsers["train"]))
        args = parser.parse_args(argv)
        return args.handler(args)
    except (UsageError, SetupError, StoppedError) as error:
        prog = f"{PROG} {command}" if command in COMMANDS else PROG
        if str(error):  # the other processes of a multi-process run leave the line to the main one
            print(f"{prog}: error: {error}", file=sys.stderr)
        return error.status if isinstance(error, StoppedError) else 2 if isinstance(error, UsageError) else 1
