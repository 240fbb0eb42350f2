"""The embedded demo: SRPO steers the toy world's unprompted style, measured by the oracles the reward never sees.

The shipped toy generator, asked for content alone ("a red circle"), draws a mix of bright and dark (and smooth
and grainy) scenes. SRPO with the control words "bright" / "dark" on the shipped toy CLIP reward should move
that mix toward bright while colour and shape stay right. Everything is measured on the same fixed noises
before, during and after training, by the analytic oracles.
"""

from __future__ import annotations

import json
import os
import time
from types import MappingProxyType

import torch

from .data import ATTRIBUTE_VALUES, STYLE_ATTRIBUTES, all_attribute_combinations
from .generator import IMAGE_SIZE, MAX_SEQUENCE_LENGTH, load_pipeline
from .oracles import oracle_labels
from .reward import load_reward

CONTENT_PROMPTS = tuple(sorted({attributes.content for attributes in all_attribute_combinations()}))

#: The trainer settings of every training run on the toy world (the demo's, and benchmarks/compare_methods.py's
#: for every method): the shipped generator's resolution and text length, its 8-step rollout, fp32 on the CPU,
#: a rank-8 LoRA, gradients clipped at 1.
TOY_TRAINER_SETTINGS = MappingProxyType(
    {
        "max_grad_norm": 1.0,
        "resolution": IMAGE_SIZE,
        "rollout_steps": 8,
        "max_sequence_length": MAX_SEQUENCE_LENGTH,
        "mixed_precision": "no",
        "cpu": True,
        "lora_rank": 8,
        "lora_alpha": 8.0,
    }
)
#: The evaluation noises are seeds EVALUATION_SEED_BASE, EVALUATION_SEED_BASE + 1, ...: the same whatever the
#: training seed.
EVALUATION_SEED_BASE = 10_000
#: Evaluation noises per content prompt by default (x 12 prompts: 96 images).
EVALUATION_SEEDS = 8


def style_attribute_of(word: str) -> str:
    """The style attribute a control word names ("bright" -> "lighting")."""
    for attribute in STYLE_ATTRIBUTES:
        if word in ATTRIBUTE_VALUES[attribute]:
            return attribute
    raise ValueError(
        f"control word {word!r} names no style of the toy world; expected one of "
        f"{[v for a in STYLE_ATTRIBUTES for v in ATTRIBUTE_VALUES[a]]}"
    )


def check_control_words(positive_word: str, negative_word: str) -> str:
    """The style attribute two control words name; a clear error unless both are values of one style."""
    positive, negative = style_attribute_of(positive_word), style_attribute_of(negative_word)
    if positive_word == negative_word:
        raise ValueError(
            f"the positive and the negative control word are both {positive_word!r}; expected two values of one style"
        )
    if positive != negative:
        raise ValueError(
            f"control words {positive_word!r} and {negative_word!r} name different styles; expected two values "
            "of one style (bright/dark or smooth/grainy)"
        )
    return positive


@torch.no_grad()
def measure(trainer, srp, prompts: list[str], seeds: list[int], positive_word: str) -> tuple[dict, torch.Tensor]:
    """Oracle and reward numbers of the trainer's current model on fixed noises, and the first seed's images."""
    batches = [trainer.generate_images(prompts, seed) for seed in seeds]
    images = torch.cat(batches)
    numbers = {
        **oracle_numbers(images, prompts * len(seeds), positive_word),
        "evaluation_srp": srp(images, prompts * len(seeds)).mean().item(),
    }
    return numbers, batches[0]


def oracle_numbers(images: torch.Tensor, prompts: list[str], positive_word: str) -> dict[str, float]:
    """What the oracles read from images of content prompts (``prompts[i]`` is image i's, "a red circle"):
    ``oracle_{positive_word}_fraction`` (the images showing the style value ``positive_word`` names), and
    ``oracle_colour_accuracy`` and ``oracle_shape_accuracy`` (the images whose colour / shape is the prompt's)."""
    attribute = style_attribute_of(positive_word)
    expected_words = [_content_words(prompt) for prompt in prompts]
    predicted = oracle_labels(images)
    target = ATTRIBUTE_VALUES[attribute].index(positive_word)
    return {
        f"oracle_{positive_word}_fraction": (predicted[attribute] == target).float().mean().item(),
        "oracle_colour_accuracy": _accuracy(predicted["colour"], [w[1] for w in expected_words], "colour"),
        "oracle_shape_accuracy": _accuracy(predicted["shape"], [w[2] for w in expected_words], "shape"),
    }


def _content_words(prompt: str) -> list[str]:
    """``"a red circle"`` -> ``["a", "red", "circle"]``; a clear error for any other prompt."""
    words = prompt.split()
    if len(words) != 3 or words[1] not in ATTRIBUTE_VALUES["colour"] or words[2] not in ATTRIBUTE_VALUES["shape"]:
        raise ValueError(f"the oracles check content prompts 'a {{colour}} {{shape}}' only, got {prompt!r}")
    return words


def _accuracy(predicted: torch.Tensor, expected: list[str], attribute: str) -> float:
    values = ATTRIBUTE_VALUES[attribute]
    return sum(values[int(p)] == e for p, e in zip(predicted, expected, strict=True)) / len(expected)


def demo_config(
    output_dir: str,
    max_train_steps: int = 10,
    learning_rate: float = 3e-3,
    train_batch_size: int = 4,
    seed: int = 0,
    positive_word: str = "bright",
    negative_word: str = "dark",
    overwrite_output_dir: bool = False,
    use_8bit_adam: bool = False,
):
    """The demo's ``SRPOConfig``; a clear error for any bad setting, before anything is loaded."""
    from ..trainers import SRPOConfig

    check_control_words(positive_word, negative_word)
    return SRPOConfig(
        **TOY_TRAINER_SETTINGS,
        output_dir=output_dir,
        overwrite_output_dir=overwrite_output_dir,
        seed=seed,
        max_train_steps=max_train_steps,
        learning_rate=learning_rate,
        train_batch_size=train_batch_size,
        positive_words=[positive_word],
        negative_words=[negative_word],
        word_schedule="fixed",
        checkpointing_steps=0,
        validation_steps=0,
        use_8bit_adam=use_8bit_adam,
    )


def run_demo(
    output_dir: str,
    evaluation_seeds: int = EVALUATION_SEEDS,
    evaluate_every: int = 5,
    quantize: str | None = None,
    use_8bit_adam: bool = False,
    **settings,
) -> dict:
    """Train an SRPO LoRA on the toy world and write the LoRA, grids, curves and metrics to ``output_dir``.

    ``settings`` are those of :func:`demo_config` (``max_train_steps``, ``learning_rate``, ``train_batch_size``,
    ``seed``, the control words, ``overwrite_output_dir``), with its defaults. The evaluation is ``evaluation_seeds``
    noises for each of the 12 content prompts (96 images by default). ``quantize`` (``"nf4"``, ``"int8"`` or
    ``"float8"``: :data:`diffusers_srpo.quantization.QUANTIZE_CHOICES`) trains the LoRA on a frozen base quantized
    in memory (computed in the pipeline's dtype), rollouts and evaluations included; ``use_8bit_adam`` steps it with
    bitsandbytes' 8-bit AdamW. The seeds and the evaluation noises are the same either way, and the metrics record
    both settings (benchmarks/toyworld/quantized_quality.py compares the bases).

    The defaults (10 updates of 4 prompts at 3e-3) stop before reward hacking takes over: on 3 training seeds they
    move the unprompted bright fraction from 0.48 by +0.33 to +0.43 while colour accuracy falls by 0.01 and shape
    accuracy by none. By 15 updates the fraction is 1.0 on every seed; by 20, on two seeds of three, some objects
    fade into an empty bright canvas (which the reward scores as "bright") and colour accuracy falls by 0.23-0.28
    (benchmarks/toyworld/RESULTS.md).
    """
    from ..atomic import staged_outputs
    from ..quantization import check_quantize, quantize_in_memory
    from ..rewards import SemanticRelativeReward
    from ..trainers import SRPOTrainer

    check_quantize(quantize)
    config = demo_config(output_dir, use_8bit_adam=use_8bit_adam, **settings)
    (positive_word,), (negative_word,) = config.positive_words, config.negative_words
    max_train_steps = config.max_train_steps
    for name, value in (("evaluation_seeds", evaluation_seeds), ("evaluate_every", evaluate_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    started = time.perf_counter()
    reward = load_reward()
    prompts = list(CONTENT_PROMPTS)
    pipe = load_pipeline()
    if quantize is not None:
        quantize_in_memory(pipe.transformer, quantize, compute_dtype=pipe.transformer.dtype)
    trainer = SRPOTrainer(pipe, reward=reward, prompts=prompts, config=config)
    srp = SemanticRelativeReward(reward, [positive_word], [negative_word], word_schedule="fixed")
    seeds = [EVALUATION_SEED_BASE + i for i in range(evaluation_seeds)]  # the same noises whatever the training seed

    before, images_before = measure(trainer, srp, prompts, seeds, positive_word)

    def evaluate(trainer, logs):
        # The last update's evaluation is ``after``, measured once below.
        if trainer.global_step % evaluate_every == 0 and trainer.global_step < max_train_steps:
            logs.update(measure(trainer, srp, prompts, seeds, positive_word)[0])

    history = trainer.train(on_update=evaluate)
    after, images_after = measure(trainer, srp, prompts, seeds, positive_word)
    if history:
        history[-1].update(after)

    fraction = f"oracle_{positive_word}_fraction"
    metrics = {
        "prompts": prompts,
        "control_words": {"positive": positive_word, "negative": negative_word},
        "max_train_steps": max_train_steps,
        "learning_rate": config.learning_rate,
        "train_batch_size": config.train_batch_size,
        "quantize": quantize,
        "use_8bit_adam": use_8bit_adam,
        "evaluation_seeds": seeds,
        "before": before,
        "after": after,
        "history": history,
        "seconds": time.perf_counter() - started,
    }
    with staged_outputs(output_dir) as staging:
        save_before_after(
            images_before,
            images_after,
            prompts,
            [
                f"before\n{before[fraction]:.0%} {positive_word}",
                f"after {max_train_steps} updates\n{after[fraction]:.0%} {positive_word}",
            ],
            f"SRPO, {positive_word!r} over {negative_word!r}: the same noises before and after training "
            f"(% {positive_word}: the oracle, over all {len(prompts) * len(seeds)} evaluation images)",
            os.path.join(staging, "before_after.png"),
        )
        plot_curves(history, before, positive_word, os.path.join(staging, "curves.png"))
        with open(os.path.join(staging, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
    return metrics


def save_before_after(
    before: torch.Tensor, after: torch.Tensor, prompts: list[str], row_labels: list[str], title: str, path: str
) -> None:
    """Two labelled rows of images on the same noises, before and after training, one column per prompt."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    columns = before.shape[0]
    figure, axes = plt.subplots(2, columns, figsize=(1.6 * columns + 1.6, 4.0), squeeze=False)
    for row, (images, label) in enumerate(zip((before, after), row_labels, strict=True)):
        for column in range(columns):
            axis = axes[row][column]
            axis.imshow(images[column].float().clamp(0, 1).permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(prompts[column].removeprefix("a "), fontsize=10)
        axes[row][0].set_ylabel(label, fontsize=11)
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_curves(history: list[dict], before: dict, positive_word: str, path: str) -> None:
    """The training rewards per update, and the oracle numbers at each evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, (reward_axis, oracle_axis) = plt.subplots(1, 2, figsize=(10, 3.5))
    steps = list(range(1, len(history) + 1))
    for key, label in (("reward_denoise", "denoise branch"), ("reward_invert", "inversion branch (swapped words)")):
        if history and key in history[0]:
            reward_axis.plot(steps, [h[key] for h in history], alpha=0.6, label=f"training SRP, {label}")
    evaluated = [(0, before)] + [(i + 1, h) for i, h in enumerate(history) if "evaluation_srp" in h]
    reward_axis.plot(
        [s for s, _ in evaluated], [h["evaluation_srp"] for _, h in evaluated], "k.-", label="evaluation SRP"
    )
    reward_axis.set_xlabel("update")
    reward_axis.set_ylabel("SRP reward")
    reward_axis.legend(fontsize=7)
    for key, label in (
        (f"oracle_{positive_word}_fraction", f"{positive_word} fraction (unprompted)"),
        ("oracle_colour_accuracy", "colour accuracy"),
        ("oracle_shape_accuracy", "shape accuracy"),
    ):
        oracle_axis.plot([s for s, _ in evaluated], [h[key] for _, h in evaluated], ".-", label=label)
    oracle_axis.set_ylim(0, 1.05)
    oracle_axis.set_xlabel("update")
    oracle_axis.set_title("oracles (never seen by the reward)", fontsize=9)
    oracle_axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
