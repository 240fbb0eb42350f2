"""The machinery every trainer of the family shares.

A method (SRPO, its baselines, TailorPO) only writes ``training_step``: the loss of one update,
returned as a list of micro-step losses (each divided by their number, then back-propagated one
after another, so that their graphs never live together) that make one optimizer step. Everything
else lives here: accelerate, LoRA or full fine-tune, prompts and their cached embeddings,
checkpoints and exact resume, outputs, logging and validation.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..models import PromptEmbeds, get_model_adapter
from ..prompts import load_prompts
from .config import TrainerConfig

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE_NAME = "trainer_state.json"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# Updates in a row without any sample under the hinge threshold before the trainer warns.
HINGE_PATIENCE = 5
# Random stream of an update's starting noise (see BaseTrainer.generator); methods number theirs from 2.
NOISE_STREAM = 1


@dataclass
class StepOutput:
    """What ``training_step`` hands back: one loss per micro-step and the numbers to log."""

    losses: list[Callable[[], torch.Tensor]]
    logs: dict[str, float]


def check_output_dir(output_dir: str, *, allow_existing: bool, remedy: str) -> None:
    """Refuse an output folder that already holds files (another run's), unless ``allow_existing``."""
    if not allow_existing and os.path.isdir(output_dir) and os.listdir(output_dir):
        raise FileExistsError(f"output_dir {output_dir!r} already holds files of another run; {remedy}")


def _mix_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (seed, step, rank, stream), stable across runs and processes."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 31
    return value & 0x7FFFFFFFFFFFFFFF


class BaseTrainer:
    """Owns the accelerate setup and the loop; subclasses define ``training_step``."""

    config_class = TrainerConfig
    #: Name of the settings file written beside the model.
    config_file_name = "trainer_config.json"
    #: Whether the method back-propagates through the reward (checked once, before any expensive work).
    needs_differentiable_reward = True

    def __init__(self, pipe, reward=None, prompts=None, config: TrainerConfig | None = None):
        self.config = config if config is not None else self.config_class()
        if not isinstance(self.config, self.config_class):
            raise TypeError(f"config must be a {self.config_class.__name__}, got {type(self.config).__name__}")
        # Cheap checks first: nothing expensive runs and nothing is written before they pass.
        self.adapter = get_model_adapter(pipe)
        self.pipe = pipe
        size = self.config.resolution
        if size % self.adapter.size_multiple:
            raise ValueError(f"resolution must be a multiple of {self.adapter.size_multiple} for this model, got {size}")
        source = prompts if prompts is not None else self.config.prompt_file
        if source is None:
            raise ValueError("no training prompts: pass prompts=[...] or a path, or set config.prompt_file")
        self.prompts = load_prompts(source)
        check_output_dir(
            self.config.output_dir,
            allow_existing=bool(self.config.resume_from_checkpoint or self.config.overwrite_output_dir),
            remedy="set resume_from_checkpoint='latest' to continue it, overwrite_output_dir=True to write over it, "
            "or choose another folder",
        )
        self.reward = self.prepare_reward(reward)

        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        self.accelerator = Accelerator(
            mixed_precision=self.config.mixed_precision,
            log_with=self.config.log_with,
            project_config=ProjectConfiguration(
                project_dir=self.config.output_dir, logging_dir=os.path.join(self.config.output_dir, "logs")
            ),
            cpu=self.config.cpu,
        )
        self.global_step = 0
        self.history: list[dict[str, float]] = []
        self._inactive_hinge_updates = 0
        self.prompt_cache: dict[str, PromptEmbeds] = {}
        self._setup_models()

    @property
    def method_name(self) -> str:
        return self.config.method

    # ----------------------------------------------------------------------------------- hooks for methods
    def prepare_reward(self, reward):
        """Check and wrap the user's reward; called before any expensive work.

        The default is a plain reward: a :class:`~diffusers_srpo.rewards.Reward` or a callable
        ``fn(images, prompts) -> Tensor[B]``, scored against ``config.reward_template``.
        """
        from ..rewards import CallableReward, PromptTemplateReward, Reward, SemanticRelativeReward

        if reward is None:
            raise ValueError(f"{type(self).__name__} needs a reward, e.g. HPSv2Reward.from_pretrained(path)")
        if isinstance(reward, SemanticRelativeReward):
            raise TypeError(
                f"got a SemanticRelativeReward; method {self.method_name!r} uses a plain reward: pass its .base "
                "(aimed with reward_template), or use method='srpo'"
            )
        if not isinstance(reward, Reward):
            if not callable(reward):
                raise TypeError(f"reward must be a Reward or a callable fn(images, prompts) -> Tensor[B], got {type(reward).__name__}")
            reward = CallableReward(reward)
        if self.config.reward_template != "{prompt}":
            reward = PromptTemplateReward(reward, self.config.reward_template)
        if self.needs_differentiable_reward:
            self.check_reward_differentiable(reward)
        return reward

    def setup_method(self) -> None:
        """Build method-specific state: called once the models are on the device and the trainable parameters are
        set, just before ``accelerator.prepare`` wraps the transformer (``self.pipe.transformer`` is still plain)."""

    def scheduler_overrides(self) -> dict:
        """Settings of the ``DirectAlignScheduler`` built from the pipeline's scheduler config."""
        return {"rollout_steps": self.config.rollout_steps}

    def training_step(self, step: int) -> StepOutput:
        raise NotImplementedError

    def model_card_details(self) -> dict[str, str]:
        return {}

    def check_reward_differentiable(self, reward: torch.nn.Module) -> None:
        """Score one small random image and check that a gradient reaches its pixels."""
        name = type(reward).__name__
        size = getattr(reward, "image_size", 64)
        images = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        images = images.to(_module_device(reward)).requires_grad_(True)
        scores = reward(images, self.prompts[:1])
        if not isinstance(scores, torch.Tensor) or scores.shape != (1,):
            raise ValueError(f"the reward must return a tensor of shape [batch], got {getattr(scores, 'shape', type(scores))}")
        if not scores.requires_grad:
            raise ValueError(f"the reward {name} is not differentiable: its score carries no gradient ({self.method_name} needs one)")
        scores.sum().backward()
        if images.grad is None or not torch.isfinite(images.grad).all() or not images.grad.abs().sum() > 0:
            raise ValueError(f"the reward {name} is not differentiable: no gradient reaches the images ({self.method_name} needs one)")

    # ----------------------------------------------------------------------------------- setup
    def _setup_models(self) -> None:
        config, accelerator = self.config, self.accelerator
        device = accelerator.device
        pipe = self.pipe
        transformer = pipe.transformer

        for module in [transformer, pipe.vae, *self.adapter.text_encoders()]:
            module.requires_grad_(False)
            module.eval()
        if config.use_lora:
            from peft import LoraConfig

            lora_config = LoraConfig(
                r=config.lora_rank,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                init_lora_weights="gaussian",
                target_modules=list(config.lora_target_modules or self.adapter.lora_target_modules),
            )
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_mix_seed(config.seed, 0x10CA))
                transformer.add_adapter(lora_config)
        else:
            # Full fine-tune: master weights in fp32; autocast gives the compute precision.
            transformer.to(torch.float32)
            transformer.requires_grad_(True)
        # The dtype of the frozen transformer weights, in which its inputs are given (fp32 for a full fine-tune).
        self.weight_dtype = transformer.dtype
        transformer.to(device)
        pipe.vae.to(device)
        self.adapter.enable_gradient_checkpointing(config.gradient_checkpointing, config.vae_gradient_checkpointing)
        self.reward.to(device)

        if config.use_lora:
            from diffusers.training_utils import cast_training_params

            cast_training_params(transformer, dtype=torch.float32)
        self.trainable_parameters = [p for p in transformer.parameters() if p.requires_grad]
        if not self.trainable_parameters:
            raise ValueError("nothing to train: no transformer parameter requires grad (check lora_target_modules)")

        optimizer = torch.optim.AdamW(
            self.trainable_parameters,
            lr=config.learning_rate,
            betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_epsilon,
            weight_decay=config.adam_weight_decay,
        )
        self.setup_method()
        from diffusers.optimization import get_scheduler

        # accelerate steps a prepared scheduler once per process per update, hence the factor.
        lr_scheduler = get_scheduler(
            config.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
            num_training_steps=config.max_train_steps * accelerator.num_processes,
        )
        self.model, self.optimizer, self.lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)
        from ..scheduling_direct_align import DirectAlignScheduler

        self.scheduler = DirectAlignScheduler.from_config(pipe.scheduler.config, **self.scheduler_overrides())
        self.rollout_sigmas = self.scheduler.rollout_sigmas(device)
        accelerator.register_save_state_pre_hook(self._save_model_hook)
        accelerator.register_load_state_pre_hook(self._load_model_hook)

    def cache_prompt_embeddings(self, prompts: list[str]) -> None:
        """Encode the prompts not yet cached, once each; keep the embeddings on the CPU, then send the encoders away."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self.prompt_cache]
        if not missing:
            return
        device = self.accelerator.device
        encoders = self.adapter.text_encoders()
        for encoder in encoders:
            encoder.to(device)
        chunk = 16
        for start in range(0, len(missing), chunk):
            batch = missing[start : start + chunk]
            embeds = self.adapter.encode_prompts(batch, device, self.config.max_sequence_length)
            for i, prompt in enumerate(batch):
                self.prompt_cache[prompt] = PromptEmbeds(
                    embeds.prompt_embeds[i : i + 1].cpu(), embeds.pooled_prompt_embeds[i : i + 1].cpu(), embeds.text_ids.cpu()
                )
        if device.type != "cpu":
            for encoder in encoders:
                encoder.to("cpu")

    def text_for(self, prompts: list[str]) -> PromptEmbeds:
        """The cached text conditioning of ``prompts`` on the training device (encoding any new prompt first)."""
        self.cache_prompt_embeddings(prompts)
        return PromptEmbeds.cat([self.prompt_cache[p] for p in prompts]).to(self.accelerator.device, self.weight_dtype)

    # ----------------------------------------------------------------------------------- data order and seeds
    def indices_for_step(self, step: int) -> list[int]:
        """This process's prompt indices for an update: a seeded shuffle per epoch, different on every process."""
        world, rank, batch = self.accelerator.num_processes, self.accelerator.process_index, self.config.train_batch_size
        chosen = []
        for item in range(batch):
            position = (step * world + rank) * batch + item
            epoch, index = divmod(position, len(self.prompts))
            order = torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(_mix_seed(self.config.seed, epoch)))
            chosen.append(int(order[index]))
        return chosen

    def generator(self, step: int, stream: int, per_process: bool) -> torch.Generator:
        """A CPU generator for one purpose (``stream``) of one update; shared by all processes unless ``per_process``."""
        rank = self.accelerator.process_index if per_process else -1
        return torch.Generator().manual_seed(_mix_seed(self.config.seed, step, stream, rank))

    def step_prompts(self, step: int) -> tuple[list[str], PromptEmbeds]:
        """This process's prompts of an update and their text conditioning."""
        prompts = [self.prompts[i] for i in self.indices_for_step(step)]
        return prompts, self.text_for(prompts)

    def step_noise(self, step: int, batch_size: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The starting noise of an update: the same on every process (their prompts differ), packed latents."""
        size = self.config.resolution
        generator = self.generator(step, NOISE_STREAM, per_process=False)
        return self.adapter.make_noise(batch_size, size, size, generator, self.accelerator.device, dtype or self.weight_dtype)

    # ----------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample_latents(self, noise: torch.Tensor, text: PromptEmbeds, sigmas: torch.Tensor, guidance: float) -> torch.Tensor:
        """Euler integration of the flow ODE along ``sigmas`` with the current model, no gradient."""
        latents = noise
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
            latents = self.euler_step(latents, sigma, sigma_next, text, guidance)
        return latents

    def euler_step(self, latents: torch.Tensor, sigma, sigma_next, text: PromptEmbeds, guidance: float) -> torch.Tensor:
        """One Euler step ``x + (sigma_next - sigma) * v`` of the current model (with gradient where enabled)."""
        size = self.config.resolution
        # Through the prepared model: under FSDP only the wrapper holds whole parameters.
        velocity = self.adapter.predict_velocity(self.model, latents, sigma, text, guidance, size, size)
        return latents + (sigma_next - sigma) * velocity

    def decode_and_score(self, latents: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Packed latents -> images -> the reward ``[B]``, differentiable in the latents."""
        size = self.config.resolution
        return self.reward(self.adapter.decode(latents, size, size), prompts)

    def hinge_loss(self, scores: torch.Tensor, logs: dict[str, float], log_key: str = "hinge_active") -> torch.Tensor:
        """``mean(relu(threshold - reward))``; logs the fraction of samples under the threshold, the only ones that
        train (``train`` warns when it stays 0)."""
        threshold = self.config.hinge_threshold
        logs[log_key] = (scores.detach() < threshold).float().mean().item()
        return torch.relu(threshold - scores).mean()

    # ----------------------------------------------------------------------------------- checkpoints
    def _save_model_hook(self, models, weights, output_dir):
        if self.accelerator.is_main_process:
            self._write_model(output_dir)
        for _ in range(len(weights)):
            weights.pop()  # only what _write_model wrote is kept: not the frozen base weights

    def _load_model_hook(self, models, input_dir):
        models.clear()
        self._read_model(input_dir)

    def _write_model(self, directory: str) -> None:
        transformer = self.accelerator.unwrap_model(self.model)
        if self.config.use_lora:
            from peft.utils import get_peft_model_state_dict

            self.adapter.save_lora_weights(
                directory, get_peft_model_state_dict(transformer), transformer.peft_config["default"].to_dict()
            )
        else:
            transformer.save_pretrained(os.path.join(directory, "transformer"), safe_serialization=True)

    def _read_model(self, directory: str) -> None:
        transformer = self.accelerator.unwrap_model(self.model)
        if self.config.use_lora:
            from peft import set_peft_model_state_dict

            state = self.adapter.lora_state_dict_for_transformer(directory)
            result = set_peft_model_state_dict(transformer, state, adapter_name="default")
            unexpected = getattr(result, "unexpected_keys", None)
            if unexpected:
                raise ValueError(f"checkpoint {directory!r} has LoRA keys this model lacks: {unexpected[:5]}")
            from diffusers.training_utils import cast_training_params

            cast_training_params(transformer, dtype=torch.float32)
        else:
            from safetensors.torch import load_file

            folder = os.path.join(directory, "transformer")
            files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
            state = {}
            for name in files:
                state.update(load_file(os.path.join(folder, name)))
            transformer.load_state_dict(state)

    def checkpoint_dirs(self) -> list[str]:
        """Complete checkpoints (those holding the trainer state, written last), oldest first."""
        out = self.config.output_dir
        if not os.path.isdir(out):
            return []
        found = []
        for name in os.listdir(out):
            match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", name)
            if match and os.path.isfile(os.path.join(out, name, TRAINER_STATE_NAME)):
                found.append((int(match.group(1)), os.path.join(out, name)))
        return [path for _, path in sorted(found)]

    def save_checkpoint(self) -> str:
        """Write ``checkpoint-N`` atomically: into a temporary folder, renamed only once complete."""
        accelerator = self.accelerator
        final = os.path.join(self.config.output_dir, f"{CHECKPOINT_PREFIX}{self.global_step}")
        partial = os.path.join(self.config.output_dir, f".partial-{CHECKPOINT_PREFIX}{self.global_step}")
        if accelerator.is_main_process and os.path.isdir(partial):
            shutil.rmtree(partial)
        accelerator.wait_for_everyone()
        accelerator.save_state(partial)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            with open(os.path.join(partial, TRAINER_STATE_NAME), "w") as f:
                json.dump({"global_step": self.global_step, "method": self.method_name, "history": self.history}, f)
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(partial, final)
            limit = self.config.checkpoints_total_limit
            if limit is not None:
                for old in self.checkpoint_dirs()[:-limit]:
                    shutil.rmtree(old)
        accelerator.wait_for_everyone()
        return final

    def _resolve_resume_path(self) -> str | None:
        wanted = self.config.resume_from_checkpoint
        if not wanted:
            return None
        if wanted == "latest":
            found = self.checkpoint_dirs()
            if not found:
                logger.warning("resume_from_checkpoint='latest' but %s holds no checkpoint: starting fresh", self.config.output_dir)
                return None
            return found[-1]
        if not os.path.isfile(os.path.join(wanted, TRAINER_STATE_NAME)):
            raise FileNotFoundError(f"resume_from_checkpoint {wanted!r} is not a complete checkpoint folder (no {TRAINER_STATE_NAME})")
        return wanted

    def _load_checkpoint(self, path: str) -> None:
        with open(os.path.join(path, TRAINER_STATE_NAME)) as f:
            state = json.load(f)
        # Checked before loading anything; checkpoints from before the method field were all SRPO's.
        written_by = state.get("method", "srpo")
        if written_by != self.method_name:
            raise ValueError(
                f"checkpoint {path!r} was written by method {written_by!r}; this run's method is {self.method_name!r}"
            )
        self.accelerator.load_state(path)
        self.global_step = state["global_step"]
        self.history = state.get("history", [])

    # ----------------------------------------------------------------------------------- outputs
    def save_outputs(self) -> None:
        """The final LoRA (or transformer), the config and a model card; main process only."""
        if not self.accelerator.is_main_process:
            return
        out = self.config.output_dir
        os.makedirs(out, exist_ok=True)
        self._write_model(out)
        self.config.to_json_file(os.path.join(out, self.config_file_name))
        with open(os.path.join(out, "README.md"), "w") as f:
            f.write(self.model_card())

    def model_card(self) -> str:
        base_model = getattr(self.pipe, "name_or_path", None) or self.pipe.config.get("_name_or_path") or "unknown"
        kind = "LoRA" if self.config.use_lora else "full fine-tune"
        details = {"base model": base_model, "method": self.method_name, "trained": kind, **self.model_card_details()}
        details["optimizer updates"] = str(self.global_step)
        lines = [
            "---",
            f"base_model: {base_model}",
            "library_name: diffusers",
            "tags: [diffusers, diffusers-srpo, lora, text-to-image, " + self.method_name + "]",
            "---",
            "",
            f"# {self.method_name.upper()} {kind} trained with diffusers-srpo",
            "",
            *[f"- **{key}**: {value}" for key, value in details.items()],
            "",
            "## Use",
            "",
            "```python",
            "from diffusers import FluxPipeline",
            f'pipe = FluxPipeline.from_pretrained("{base_model}", torch_dtype=torch.bfloat16)',
            'pipe.load_lora_weights("path/to/this/folder")' if self.config.use_lora else "# load transformer/ with FluxTransformer2DModel.from_pretrained",
            "```",
            "",
            "## Settings",
            "",
            "```json",
            json.dumps(self.config.to_dict(), indent=2),
            "```",
            "",
        ]
        return "\n".join(lines)

    @torch.no_grad()
    def generate_images(self, prompts: list[str], seed: int) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] of the current model: the rollout sampler (the training
        distribution: rollout schedule and guidance) from noise drawn with ``seed``."""
        size = self.config.resolution
        text = self.text_for(prompts)
        noise = self.adapter.make_noise(
            len(prompts), size, size, torch.Generator().manual_seed(seed), self.accelerator.device, self.weight_dtype
        )
        latents = self.sample_latents(noise, text, self.rollout_sigmas, self.config.rollout_guidance)
        return self.adapter.decode(latents, size, size)

    def save_validation_grid(self) -> str | None:
        prompts = self.config.validation_prompts
        if not prompts:
            return None
        from torchvision.utils import save_image

        # Every process samples (through the prepared model, as FSDP and DDP need); the main one saves.
        images = self.generate_images(prompts, self.config.validation_seed)
        if not self.accelerator.is_main_process:
            return None
        folder = os.path.join(self.config.output_dir, "validation")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"step-{self.global_step:06d}.png")
        save_image(images.float().cpu(), path, nrow=min(len(prompts), 4))
        return path

    # ----------------------------------------------------------------------------------- the loop
    def _check_hinge(self, logs: dict[str, float]) -> None:
        """Warn once when no sample of any process was under the hinge threshold for HINGE_PATIENCE updates in a
        row: a reward on another scale than the threshold (aesthetic ~5 against 0.7) trains nothing."""
        active = [value for key, value in logs.items() if key.startswith("hinge_active")]
        if not active:
            return
        self._inactive_hinge_updates = self._inactive_hinge_updates + 1 if max(active) == 0 else 0
        if self._inactive_hinge_updates == HINGE_PATIENCE and self.accelerator.is_main_process:
            logger.warning(
                "for %d updates every reward was above hinge_threshold=%s (last mean %.3f), so the loss and its "
                "gradient were 0: raise hinge_threshold above the reward's range",
                HINGE_PATIENCE, self.config.hinge_threshold, logs.get("reward", float("nan")),
            )  # fmt: skip

    def _iterate_steps(self) -> Iterator[int]:
        from tqdm.auto import tqdm

        bar = tqdm(
            range(self.global_step, self.config.max_train_steps),
            initial=self.global_step,
            total=self.config.max_train_steps,
            desc=self.method_name,
            disable=not self.accelerator.is_local_main_process,
        )
        for step in bar:
            yield step
            if self.history:
                bar.set_postfix({k: f"{v:.4f}" for k, v in self.history[-1].items() if k in ("loss", "reward")})

    def train(self, on_update: Callable[[BaseTrainer, dict[str, float]], None] | None = None):
        """Run the updates; write the outputs. Returns the per-update logs.

        ``on_update(trainer, logs)`` runs after every update, before the logs are recorded: an evaluation can
        add its own numbers to ``logs`` (the demo measures the toy world's oracles this way).
        """
        config, accelerator = self.config, self.accelerator
        # Every prompt is encoded up front, so that the text encoders can leave the GPU for the whole run.
        self.cache_prompt_embeddings(self.prompts + list(config.validation_prompts or []))
        resume = self._resolve_resume_path()
        if resume is not None:
            self._load_checkpoint(resume)
        if accelerator.is_main_process:
            os.makedirs(config.output_dir, exist_ok=True)
        if config.log_with:
            accelerator.init_trackers(f"diffusers-srpo-{self.method_name}", config=_flat_config(config))

        self.model.train()
        for step in self._iterate_steps():
            output = self.training_step(step)
            # The micro-step losses (SRPO's two branches, TailorPO's steps) accumulate into one update; their graphs
            # are built and freed one after another. Only the last backward all-reduces the gradients across
            # processes. (accelerate's own `accumulate` keeps its step count in a process-wide singleton, which a
            # second trainer built in the same process would overwrite.)
            loss_fns = output.losses
            if not loss_fns:
                raise RuntimeError(f"{type(self).__name__}.training_step returned no loss for step {step}")
            loss_values = []
            for index, loss_fn in enumerate(loss_fns):
                is_last = index == len(loss_fns) - 1
                with contextlib.nullcontext() if is_last else accelerator.no_sync(self.model):
                    loss = loss_fn() / len(loss_fns)
                    accelerator.backward(loss)
                loss_values.append(loss.detach().item())
            if config.max_grad_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(self.trainable_parameters, config.max_grad_norm)
                output.logs["grad_norm"] = float(grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.global_step = step + 1
            output.logs["loss"] = sum(loss_values)
            # One collective for all the numbers: every process logs the same keys in the same order.
            names = list(output.logs)
            means = accelerator.reduce(torch.tensor([output.logs[k] for k in names], device=accelerator.device), "mean")
            logs = dict(zip(names, means.tolist(), strict=True))
            logs["lr"] = self.lr_scheduler.get_last_lr()[0]
            self._check_hinge(logs)
            if on_update is not None:
                on_update(self, logs)
            self.history.append(logs)
            accelerator.log(logs, step=self.global_step)
            if config.checkpointing_steps and self.global_step % config.checkpointing_steps == 0:
                self.save_checkpoint()
            if config.validation_steps and self.global_step % config.validation_steps == 0:
                self.save_validation_grid()

        accelerator.wait_for_everyone()
        self.save_outputs()
        accelerator.end_training()
        return self.history


def _flat_config(config: TrainerConfig) -> dict:
    """Tracker-friendly config: lists and None become strings."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.to_dict().items()}



def _module_device(module) -> torch.device:
    parameter = next(iter(module.parameters()), None) if isinstance(module, torch.nn.Module) else None
    return parameter.device if parameter is not None else torch.device("cpu")
