"""The LAION aesthetic predictor: an MLP on L2-normalised CLIP ViT-L/14 image embeddings; text-free."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import CLIPLikeReward, Reward
from .checkpoints import load_state_dict_strict, read_state_dict

AESTHETIC_SOURCE = (
    "the LAION aesthetic predictor weights are sac+logos+ava1-l14-linearMSE.pth from "
    "https://github.com/christophschuhmann/improved-aesthetic-predictor; download it and pass its path"
)


class AestheticMLP(torch.nn.Module):
    """The improved-aesthetic-predictor head, with its state-dict layout (``layers.0`` ... ``layers.7``).

    ``Linear(d, 1024) Dropout Linear(1024, 128) Dropout Linear(128, 64) Dropout Linear(64, 16) Linear(16, 1)``;
    ``d`` is 768 for CLIP ViT-L/14. The dropouts are inert in eval mode but keep the layer indices.
    """

    def __init__(self, input_dim: int = 768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_dim, 1024),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    @property
    def input_dim(self) -> int:
        return self.layers[0].in_features

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)


class AestheticReward(Reward):
    """``mlp(normalise(f_img(x)))``: LAION's aesthetic score (about 1 to 10) of each image; prompts are ignored.

    Args:
        clip: the CLIP-like reward whose ``encode_image`` gives the embeddings (OpenAI CLIP ViT-L/14
            for the real weights).
        mlp: the predictor head; its input width must equal the CLIP embedding width.
    """

    uses_text = False

    def __init__(self, clip: CLIPLikeReward, mlp: AestheticMLP):
        super().__init__()
        embed_dim = getattr(clip, "embed_dim", None)
        if embed_dim is not None and embed_dim != mlp.input_dim:
            raise ValueError(
                f"the CLIP image embeddings have width {embed_dim} but the aesthetic MLP expects "
                f"{mlp.input_dim}; use the CLIP it was trained on (ViT-L/14: 768)"
            )
        self.clip = clip
        self.mlp = mlp
        self._freeze()

    def score(self, images: torch.Tensor, prompts: Sequence[str] | None) -> torch.Tensor:
        embeddings = self.clip.encode_image(images)
        return self.mlp(embeddings.to(self.mlp.layers[0].weight.dtype)).squeeze(-1)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        clip: CLIPLikeReward | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> AestheticReward:
        """Load the MLP weights from ``path`` (``torch.save(state_dict)`` or safetensors).

        ``clip`` defaults to OpenAI CLIP ViT-L/14 through open_clip (``ViT-L-14-quickgelu`` / ``openai``),
        which is downloaded unless cached; pass a loaded :class:`~diffusers_srpo.rewards.CLIPReward` instead.
        """
        state_dict = read_state_dict(path, what="aesthetic MLP", source=AESTHETIC_SOURCE)
        first_weight = state_dict.get("layers.0.weight")
        if first_weight is None or first_weight.ndim != 2:
            keys = ", ".join(sorted(state_dict)[:5])
            raise ValueError(
                f"aesthetic MLP checkpoint '{path}' has no 2-D 'layers.0.weight' (first keys: {keys}); {AESTHETIC_SOURCE}"
            )
        mlp = AestheticMLP(input_dim=first_weight.shape[1])
        load_state_dict_strict(mlp, state_dict, what="aesthetic MLP", path=path)
        if clip is None:
            from .clip import CLIPReward

            clip = CLIPReward.from_pretrained("ViT-L-14-quickgelu", pretrained="openai")
        return cls(clip, mlp).to(device=device, dtype=dtype)
