"""A toy world where a generator and a reward really know a few concepts, with analytic oracles for the truth.

No real weights can be downloaded in the tests, so this world is small enough to learn on a CPU: images of one
shape in one colour (:mod:`.data`), under a bright or dark lighting, smooth or grainy; captions that always name
the content and only sometimes the style. :mod:`.oracles` reads each attribute back from the pixels with no
learning, to measure generated images independently of any reward; :mod:`.reward` is a small open_clip model
trained on the captions and shipped with the package, which Semantic Relative Preference can use with
``"bright"`` / ``"dark"`` or ``"grainy"`` / ``"smooth"`` as control words.

>>> from diffusers_srpo.toyworld import ToyShapesDataset, load_reward, oracle_accuracy
>>> batch = ToyShapesDataset(seed=0).batch(range(256))
>>> oracle_accuracy(batch.images, batch.labels)["lighting"]
1.0
>>> reward = load_reward()  # a frozen CLIPReward, offline
"""

from .data import (
    ATTRIBUTE_VALUES,
    ATTRIBUTES,
    COLOURS,
    LIGHTINGS,
    SHAPES,
    STYLE_ATTRIBUTES,
    TEXTURES,
    ToyAttributes,
    ToyBatch,
    ToySample,
    ToyShapesDataset,
    all_attribute_combinations,
    collate_samples,
    content_prompt,
    labels_from_attributes,
    make_caption,
    render_images,
    style_prompt,
)
from .oracles import (
    ORACLES,
    oracle_accuracy,
    oracle_labels,
    predict_colour,
    predict_lighting,
    predict_shape,
    predict_texture,
    style_fraction,
)
from .reward import (
    REWARD_CLIP_CONFIG,
    REWARD_WEIGHTS_DIR,
    load_reward,
    srp_difference,
    zero_shot_accuracy,
    zero_shot_predictions,
    zero_shot_prompts,
)

__all__ = [
    "ATTRIBUTES",
    "ATTRIBUTE_VALUES",
    "COLOURS",
    "LIGHTINGS",
    "ORACLES",
    "REWARD_CLIP_CONFIG",
    "REWARD_WEIGHTS_DIR",
    "SHAPES",
    "STYLE_ATTRIBUTES",
    "TEXTURES",
    "ToyAttributes",
    "ToyBatch",
    "ToySample",
    "ToyShapesDataset",
    "all_attribute_combinations",
    "collate_samples",
    "content_prompt",
    "labels_from_attributes",
    "load_reward",
    "make_caption",
    "oracle_accuracy",
    "oracle_labels",
    "predict_colour",
    "predict_lighting",
    "predict_shape",
    "predict_texture",
    "render_images",
    "srp_difference",
    "style_fraction",
    "style_prompt",
    "zero_shot_accuracy",
    "zero_shot_predictions",
    "zero_shot_prompts",
]
