"""Train an SRPO LoRA for FLUX.1-dev with HPSv2.1 (or any CLIP-like reward).

Every ``SRPOConfig`` field is a command-line option (``--help`` lists them with their help), on top of
the model and the reward. One GPU:

    accelerate launch examples/train_srpo_flux.py \
        --model black-forest-labs/FLUX.1-dev --reward hpsv2:HPS_v2.1_compressed.pt \
        --prompt_file prompts.txt --output_dir srpo-flux-lora --resolution 720 --max_train_steps 200

Several GPUs: the same command with ``accelerate launch --num_processes N``; every process draws its own
prompts and timesteps and shares the noise prior of the step (SPEC section 1). The result loads into
any stock pipeline with ``pipe.load_lora_weights("srpo-flux-lora")``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
from diffusers import FluxPipeline
from transformers import HfArgumentParser

from diffusers_srpo import SRPOConfig, SRPOTrainer, load_reward

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class ModelArguments:
    model: str = field(
        default="black-forest-labs/FLUX.1-dev", metadata={"help": "FluxPipeline to align: a hub id or a local folder."}
    )
    reward: str = field(
        default="hpsv2:v2.1",
        metadata={
            "help": "Reward as NAME[:SOURCE]: hpsv2[:checkpoint.pt|v2.1|v2.0], pickscore[:folder_or_id], "
            "clip:name_or_path, aesthetic:mlp_weights."
        },
    )
    torch_dtype: str = field(
        default="bfloat16", metadata={"help": "Weight dtype of the frozen modules: bfloat16, float16 or float32."}
    )


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser((ModelArguments, SRPOConfig))
    model_args, config = parser.parse_args_into_dataclasses(args=argv)
    if model_args.torch_dtype not in DTYPES:
        parser.error(f"--torch_dtype must be one of {', '.join(DTYPES)}, got {model_args.torch_dtype!r}")
    pipe = FluxPipeline.from_pretrained(model_args.model, torch_dtype=DTYPES[model_args.torch_dtype])
    trainer = SRPOTrainer(pipe, reward=load_reward(model_args.reward), config=config)
    trainer.train()
    print(f"wrote the LoRA, its model card and the config to {config.output_dir}")


if __name__ == "__main__":
    main(sys.argv[1:])
