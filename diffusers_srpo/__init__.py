"""diffusers-srpo: align text-to-image flow models (FLUX.1-dev first) with human preference.

Direct-Align + Semantic Relative Preference (SRPO, Shen et al. 2025) and TailorPO
(Ren et al. 2025) as drop-in classes for Hugging Face diffusers.
"""

__version__ = "0.1.0.dev0"

from . import ops

__all__ = ["__version__", "ops"]
