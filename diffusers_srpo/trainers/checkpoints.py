"""Finding and checking resumable checkpoints, before any model is loaded.

A checkpoint is a folder ``checkpoint-N`` of the output folder, written by ``accelerator.save_state`` into a
temporary name and renamed once complete; ``trainer_state.json``, written last, marks it complete.
"""

from __future__ import annotations

import json
import os
import re

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE_NAME = "trainer_state.json"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
TRANSFORMER_FOLDER = "transformer"
# Under FSDP: the sharded optimizer state, a torch distributed checkpoint.
OPTIMIZER_FOLDER = "optimizer"


def checkpoint_dirs(output_dir: str) -> list[str]:
    """Complete checkpoints of ``output_dir`` (those holding the trainer state, written last), oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", name)
        if match and os.path.isfile(os.path.join(output_dir, name, TRAINER_STATE_NAME)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return [path for _, path in sorted(found)]


def read_trainer_state(path: str, *, method: str, use_lora: bool, fsdp: bool = False) -> dict:
    """The trainer state of checkpoint ``path``, checked against the run that wants to resume from it.

    Raises ``FileNotFoundError`` for a folder that is not a complete checkpoint and ``ValueError`` for one whose
    state is unreadable, was written by another method, holds the other kind of model (LoRA / full), or keeps its
    optimizer state the other way (sharded by FSDP or whole).
    """
    state_file = os.path.join(path, TRAINER_STATE_NAME)
    if not os.path.isfile(state_file):
        raise FileNotFoundError(
            f"resume_from_checkpoint {path!r} is not a complete checkpoint folder (no {TRAINER_STATE_NAME}); "
            "expected 'latest' or a checkpoint-N folder of an earlier run"
        )
    try:
        with open(state_file, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"checkpoint {path!r}: {TRAINER_STATE_NAME} cannot be read ({error})") from None
    step = state.get("global_step") if isinstance(state, dict) else None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"checkpoint {path!r}: {TRAINER_STATE_NAME} holds no global_step >= 0 (got {step!r})")
    # Checkpoints from before the method field were all SRPO's.
    written_by = state.get("method", "srpo")
    if written_by != method:
        raise ValueError(f"checkpoint {path!r} was written by method {written_by!r}; this run's method is {method!r}")
    model_files = LORA_WEIGHT_NAME if use_lora else TRANSFORMER_FOLDER
    if not os.path.exists(os.path.join(path, model_files)):
        kind, other = ("a LoRA", "a full fine-tune") if use_lora else ("a full fine-tune", "a LoRA")
        raise ValueError(f"checkpoint {path!r} holds no {model_files}: this run trains {kind}, was it {other}?")
    if bool(state.get("fsdp", False)) != fsdp:
        written, wanted = ("with", "without") if state.get("fsdp") else ("without", "with")
        raise ValueError(
            f"checkpoint {path!r} was written {written} fsdp (its optimizer state is kept that way); this run is "
            f"{wanted}: resume it with fsdp={not fsdp}"
        )
    return state


def resolve_resume_checkpoint(config) -> str | None:
    """The checkpoint ``config.resume_from_checkpoint`` names (``'latest'``: the newest complete one of
    ``config.output_dir``, ``None`` if there is none: a fresh start), checked by :func:`read_trainer_state`."""
    wanted = config.resume_from_checkpoint
    if not wanted:
        return None
    if wanted == "latest":
        found = checkpoint_dirs(config.output_dir)
        if not found:
            # A fresh start would write over a finished run's outputs: only when asked to.
            finished = [n for n in (LORA_WEIGHT_NAME, TRANSFORMER_FOLDER) if os.path.exists(os.path.join(config.output_dir, n))]
            if finished and not config.overwrite_output_dir:
                raise FileExistsError(
                    f"resume_from_checkpoint='latest' but output_dir {config.output_dir!r} holds no checkpoint, only a "
                    f"finished run's {finished[0]}: set overwrite_output_dir to train afresh over it, or choose another folder"
                )
            return None
        wanted = found[-1]
    read_trainer_state(wanted, method=config.method, use_lora=config.use_lora, fsdp=config.fsdp)
    return wanted
