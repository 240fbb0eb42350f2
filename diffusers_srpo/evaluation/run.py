"""One ``evaluate`` run: which images and scores it needs, which are already in its folder, rendering, scoring and
writing the outputs."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..atomic import move_into_place, staged_outputs
from ..rewards.registry import load_reward
from .report import GRID_MAX_PROMPTS, save_labelled_grid, summary_markdown
from .statistics import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, mean_with_interval

BASE = "base"
RECORD_NAME = "evaluation.json"
SCORES_NAME = "scores.jsonl"
IMAGES_NAME = "images"
#: Everything ``evaluate`` writes into its output folder (and ``--overwrite_output_dir`` removes first).
OUTPUT_NAMES = (RECORD_NAME, SCORES_NAME, "summary.json", "summary.md", "grid.png", IMAGES_NAME)
#: scores.jsonl is rewritten whole (renamed into place) this often while scoring, and after each reward: a kill loses
#: at most this much work, and a long run does not rewrite a large file after every batch.
SCORES_SAVE_SECONDS = 30.0


def image_seed(seed: int, prompt_index: int) -> int:
    """The noise seed of image (``prompt_index``, ``seed``): a stable mix, independent across prompts."""
    return int(np.random.SeedSequence([seed, prompt_index]).generate_state(1, dtype=np.uint64)[0])


def is_toy_world_model(model: str) -> bool:
    """Whether ``model`` is the shipped toy-world pipeline folder (the same folder, by real path)."""
    from ..toyworld.generator import PIPELINE_DIR

    return os.path.isdir(model) and os.path.samefile(model, PIPELINE_DIR)


def _weights_sha256(path: str) -> str:
    """Digest of a LoRA file, or of the ``.safetensors`` files of a LoRA folder: a retrained LoRA is another one."""
    if os.path.isfile(path):
        files = [path]
    else:
        files = sorted(os.path.join(path, name) for name in os.listdir(path) if name.endswith(".safetensors"))
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Variant:
    """The base model (``lora`` None) or the base with one LoRA at ``scale``."""

    name: str
    lora: str | None = None  # an absolute path, or a hub id
    scale: float | None = None
    weights_sha256: str | None = None  # of a local LoRA

    def identity(self) -> dict:
        return {"lora": self.lora, "scale": self.scale, "weights_sha256": self.weights_sha256}


def variants_for(loras: list[tuple[str, float]]) -> list[Variant]:
    """``base`` and one variant per ``(path, scale)``, named after the LoRA's folder (or file, or hub repository),
    with ``@scale`` unless the scale is 1, made unique with ``-2``, ``-3``, ..."""
    from ..trainers.base import LORA_WEIGHT_NAME

    variants, taken = [Variant(BASE)], {BASE}
    for path, scale in loras:
        local = os.path.exists(path)
        where = os.path.normpath(os.path.abspath(path) if local else path)
        stem = os.path.basename(os.path.dirname(where) if os.path.basename(where) == LORA_WEIGHT_NAME else where)
        stem = re.sub(r"[^A-Za-z0-9._-]+", "-", stem.removesuffix(".safetensors")).strip("-.") or "lora"
        name = stem if scale == 1 else f"{stem}@{scale:g}"
        unique, number = name, 2
        while unique in taken:
            unique, number = f"{name}-{number}", number + 1
        taken.add(unique)
        variants.append(Variant(unique, where if local else path, scale, _weights_sha256(path) if local else None))
    return variants


def _named_value(prompt: str, values: tuple[str, ...]) -> str | None:
    """The one value of ``values`` that ``prompt`` names as a word, or None (none, or several)."""
    named = [value for value in values if re.search(rf"\b{value}\b", prompt.lower())]
    return named[0] if len(named) == 1 else None


class Evaluation:
    """One ``evaluate`` run into ``output_dir``: which images and scores it needs, which are there, and the outputs.

    ``sampler`` holds the settings that decide an image (size, steps, guidance, negative prompt, text length, dtype);
    with ``model``, the prompts and the variants' LoRAs it is what a rerun must share to resume.
    """

    def __init__(self, output_dir, model, prompts, seeds, loras, reward_specs, sampler: dict, batch_size: int):
        self.output_dir, self.prompts, self.seeds = output_dir, list(prompts), list(seeds)
        self.reward_specs, self.batch_size = list(reward_specs), batch_size
        self.variants = variants_for(loras)
        self.record = {
            "model": os.path.abspath(model) if os.path.isdir(model) else model,
            "prompts": self.prompts,
            "sampler": sampler,
            "variants": {variant.name: variant.identity() for variant in self.variants},
        }
        # The oracles read square images (the toy world's own shape).
        self.toy_world = is_toy_world_model(model) and sampler["height"] == sampler["width"]
        self.keys = [(v.name, i, s) for v in self.variants for i in range(len(self.prompts)) for s in self.seeds]
        self.scores: dict[tuple, dict[str, float]] = {}
        self.oracle_readings: dict[tuple, dict[str, str]] = {}
        self.overwrite = False
        self.previous_variants: dict = {}

    def image_path(self, key) -> str:
        variant, prompt_index, seed = key
        return os.path.join(self.output_dir, IMAGES_NAME, variant, f"{prompt_index}-{seed}.png")

    # ------------------------------------------------------------------------------------------- before loading
    def check_output_dir(self, overwrite: bool) -> None:
        """Refuse a folder that is a file, or that holds another run's files or an evaluation with other settings,
        unless ``overwrite``; read back the scores of the images already there. Nothing is written."""
        from ..trainers.base import check_output_dir

        check_output_dir(self.output_dir, allow_existing=True, remedy="")
        self.overwrite = overwrite
        if overwrite or not os.path.isdir(self.output_dir) or not os.listdir(self.output_dir):
            return
        remedy = "pass --overwrite_output_dir or choose another --output_dir"
        try:
            with open(os.path.join(self.output_dir, RECORD_NAME)) as f:
                previous = json.load(f)
            self.previous_variants = dict(previous["variants"])
        except (OSError, ValueError, KeyError, TypeError):
            message = f"output_dir {self.output_dir!r} already holds files of another run; {remedy}"
            raise FileExistsError(message) from None
        previous_sampler = previous.get("sampler") or {}
        differences = [name for name in ("model", "prompts") if previous.get(name) != self.record[name]]
        differences += [
            f"{name} ({previous_sampler.get(name)!r} there)"
            for name, value in self.record["sampler"].items()
            if previous_sampler.get(name) != value
        ]
        differences += [
            f"the LoRA of variant {name!r}"
            for name, identity in self.record["variants"].items()
            if name in self.previous_variants and self.previous_variants[name] != identity
        ]
        if differences:
            raise FileExistsError(
                f"output_dir {self.output_dir!r} holds an evaluation with other settings: {', '.join(differences)}; "
                f"rerun with the same ones to resume, {remedy}"
            )
        self.scores = self._read_scores(remedy)

    def missing_images(self) -> list[tuple]:
        return [key for key in self.keys if self.overwrite or not os.path.isfile(self.image_path(key))]

    def rewards_to_run(self) -> list[str]:
        """The rewards that some image (one to render included) has no score of."""
        return [spec for spec in self.reward_specs if any(spec not in self.scores.get(key, {}) for key in self.keys)]

    def check_rewards_load(self) -> None:
        """Load each reward that has work to do once and let it go: a spec that does not load fails before any image
        is rendered or any file written."""
        for spec in self.rewards_to_run():
            try:
                load_reward(spec)
            except Exception as error:  # any failure to build the reward is the same fault to the user
                raise ValueError(f"reward {spec!r} does not load: {' '.join(str(error).split())}") from error
            gc.collect()

    # ------------------------------------------------------------------------------------------- the run
    def start(self) -> None:
        """Clear a run written over; record the settings."""
        if self.overwrite:
            for name in OUTPUT_NAMES:
                path = os.path.join(self.output_dir, name)
                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.remove(path)
        record = {**self.record, "variants": {**self.previous_variants, **self.record["variants"]}}
        with staged_outputs(self.output_dir) as staging:
            with open(os.path.join(staging, RECORD_NAME), "w") as f:
                json.dump(record, f, indent=2)
        # Scores of images about to be rendered again go now, so that a kill during rendering cannot pair them
        # with the new images.
        self._write_scores()

    def _read_scores(self, remedy: str) -> dict:
        """The scores in ``scores.jsonl`` of this run's images that are still there, for this run's rewards."""
        path = os.path.join(self.output_dir, SCORES_NAME)
        if not os.path.isfile(path):
            return {}
        wanted = set(self.keys)
        scores = {}
        with open(path) as f:
            for number, line in enumerate(f, start=1):
                try:
                    entry = json.loads(line)
                    key = (entry["variant"], entry["prompt_index"], entry["seed"])
                    values = {spec: float(v) for spec, v in entry["scores"].items() if spec in self.reward_specs}
                except (ValueError, KeyError, TypeError, AttributeError):
                    raise ValueError(f"{path}:{number} is not a line that evaluate writes; {remedy}") from None
                if key in wanted and os.path.isfile(self.image_path(key)):
                    scores[key] = values
        return scores

    def _write_scores(self) -> None:
        """``scores.jsonl`` anew: a line for each image with a score or an oracle reading, renamed into place."""
        lines = []
        for key in self.keys:
            if key not in self.scores and key not in self.oracle_readings:
                continue
            variant, prompt_index, seed = key
            entry = {
                "variant": variant,
                "prompt_index": prompt_index,
                "seed": seed,
                "prompt": self.prompts[prompt_index],
                "image": os.path.relpath(self.image_path(key), self.output_dir),
                "scores": self.scores.get(key, {}),
            }
            if key in self.oracle_readings:
                entry["oracles"] = self.oracle_readings[key]
            lines.append(json.dumps(entry) + "\n")
        with staged_outputs(self.output_dir) as staging:
            with open(os.path.join(staging, SCORES_NAME), "w") as f:
                f.writelines(lines)

    @torch.no_grad()
    def render(self, pipe, call_settings: dict, adapter_names: list[str]) -> int:
        """Render the missing images with the stock ``pipe``, whose LoRAs are loaded as ``adapter_names`` (one per
        LoRA variant, in order); variants switch by enabling one adapter, or none for the base. Returns the count."""
        from tqdm.auto import tqdm

        missing = self.missing_images()
        adapters = dict(zip([v.name for v in self.variants[1:]], adapter_names, strict=True))
        sampler = self.record["sampler"]
        pipe.set_progress_bar_config(disable=True)  # the images' bar below says it all
        with tqdm(total=len(missing), desc="render", unit="image") as bar:
            for variant in self.variants:
                todo = [key for key in missing if key[0] == variant.name]
                if not todo:
                    continue
                if variant.lora is None and adapters:
                    pipe.disable_lora()
                elif variant.lora is not None:
                    pipe.enable_lora()
                    pipe.set_adapters([adapters[variant.name]], adapter_weights=[variant.scale])
                os.makedirs(os.path.dirname(self.image_path(todo[0])), exist_ok=True)
                for start in range(0, len(todo), self.batch_size):
                    batch = todo[start : start + self.batch_size]
                    images = pipe(
                        prompt=[self.prompts[i] for _, i, _ in batch],
                        generator=[torch.Generator().manual_seed(image_seed(s, i)) for _, i, s in batch],
                        height=sampler["height"],
                        width=sampler["width"],
                        num_inference_steps=sampler["num_inference_steps"],
                        **call_settings,
                    ).images
                    for key, image in zip(batch, images, strict=True):
                        path = self.image_path(key)
                        partial = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.partial")
                        image.save(partial, format="PNG")
                        move_into_place(partial, path)
                    bar.update(len(batch))
        return len(missing)

    def _load_images(self, keys) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1]: the images as written, so that a resumed run scores what a fresh one does."""
        from PIL import Image
        from torchvision.transforms.v2.functional import pil_to_tensor

        images = []
        for key in keys:
            with Image.open(self.image_path(key)) as image:
                images.append(pil_to_tensor(image.convert("RGB")))
        return torch.stack(images).float() / 255

    @torch.no_grad()
    def score(self, device) -> int:
        """Score every image that lacks a reward's score, one reward loaded at a time, a batch per call; read the
        toy world's oracles. Returns the number of scores computed."""
        from tqdm.auto import tqdm

        computed = 0
        for spec in self.reward_specs:
            todo = [key for key in self.keys if spec not in self.scores.get(key, {})]
            if not todo:
                continue
            reward = load_reward(spec, device=device, dtype=torch.float32)
            saved = time.monotonic()
            with tqdm(total=len(todo), desc=f"score {spec}", unit="image") as bar:
                for start in range(0, len(todo), self.batch_size):
                    batch = todo[start : start + self.batch_size]
                    values = reward(self._load_images(batch).to(device), [self.prompts[i] for _, i, _ in batch])
                    for key, value in zip(batch, values.tolist(), strict=True):
                        self.scores.setdefault(key, {})[spec] = value
                    bar.update(len(batch))
                    if time.monotonic() - saved > SCORES_SAVE_SECONDS:
                        self._write_scores()
                        saved = time.monotonic()
            computed += len(todo)
            self._write_scores()
            del reward  # before the next one loads: one reward in memory at a time
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if self.toy_world:
            self._read_oracles()
        return computed

    def _read_oracles(self) -> None:
        from ..toyworld.data import ATTRIBUTE_VALUES
        from ..toyworld.oracles import oracle_labels

        for start in range(0, len(self.keys), self.batch_size):
            batch = self.keys[start : start + self.batch_size]
            labels = oracle_labels(self._load_images(batch))
            for index, key in enumerate(batch):
                self.oracle_readings[key] = {name: ATTRIBUTE_VALUES[name][int(labels[name][index])] for name in labels}
        self._write_scores()

    # ------------------------------------------------------------------------------------------- outputs
    def _matrix(self, variant: str, value_of) -> np.ndarray:
        """``[prompt, seed]`` of ``value_of(key)``."""
        rows = [[value_of((variant, i, s)) for s in self.seeds] for i in range(len(self.prompts))]
        return np.array(rows, dtype=np.float64)

    def _oracle_matrices(self, variant: str) -> dict[str, np.ndarray]:
        """Per oracle metric, ``[prompt, seed]`` of 0 / 1, over the prompts it applies to."""
        from ..toyworld.data import ATTRIBUTE_VALUES, STYLE_ATTRIBUTES

        read = self.oracle_readings
        matrices = {
            f"oracle_{value}_fraction": self._matrix(variant, lambda key, a=attribute, v=value: read[key][a] == v)
            for attribute in STYLE_ATTRIBUTES
            for value in ATTRIBUTE_VALUES[attribute]
        }
        for attribute in ("colour", "shape"):
            named = [_named_value(prompt, ATTRIBUTE_VALUES[attribute]) for prompt in self.prompts]
            rows = [i for i, value in enumerate(named) if value is not None]
            if rows:
                hits = self._matrix(variant, lambda key, a=attribute, named=named: read[key][a] == named[key[1]])
                matrices[f"oracle_{attribute}_accuracy"] = hits[rows]
        return matrices

    def summarize(self) -> dict:
        base = {spec: self._matrix(BASE, lambda key, spec=spec: self.scores[key][spec]) for spec in self.reward_specs}
        variants = {}
        for variant in self.variants:
            entry = {"lora": variant.lora, "scale": variant.scale, "scores": {}}
            for spec in self.reward_specs:
                values = self._matrix(variant.name, lambda key, spec=spec: self.scores[key][spec])
                entry["scores"][spec] = mean_with_interval(values)
                if variant.lora is not None:
                    wins = mean_with_interval((values > base[spec]).astype(np.float64))
                    difference = mean_with_interval(values - base[spec])
                    entry["scores"][spec]["against_base"] = {
                        "win_rate": wins["mean"],
                        "win_rate_ci95": wins["ci95"],
                        "tie_rate": float((values == base[spec]).mean()),
                        "mean_difference": difference["mean"],
                        "mean_difference_ci95": difference["ci95"],
                    }
            if self.oracle_readings:
                matrices = self._oracle_matrices(variant.name)
                entry["oracles"] = {name: mean_with_interval(values) for name, values in matrices.items()}
            variants[variant.name] = entry
        return {
            "model": self.record["model"],
            "prompts": len(self.prompts),
            "seeds": self.seeds,
            "images_per_variant": len(self.prompts) * len(self.seeds),
            "sampler": self.record["sampler"],
            "rewards": self.reward_specs,
            "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED, "over": "prompts", "level": 0.95},
            "variants": variants,
        }

    def write_outputs(self) -> tuple[dict, str]:
        """Write ``summary.json``, ``summary.md`` and ``grid.png``; return the summary and the markdown."""
        summary = self.summarize()
        shown = min(len(self.prompts), GRID_MAX_PROMPTS)
        markdown = summary_markdown(summary, grid_prompts=shown)
        with staged_outputs(self.output_dir) as staging:
            with open(os.path.join(staging, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
            with open(os.path.join(staging, "summary.md"), "w") as f:
                f.write(markdown)
            save_labelled_grid(
                os.path.join(staging, "grid.png"),
                [[self.image_path((v.name, i, self.seeds[0])) for v in self.variants] for i in range(shown)],
                row_labels=self.prompts[:shown],
                column_labels=[v.name for v in self.variants],
            )
        return summary, markdown
