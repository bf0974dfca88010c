"""redrafter: ReDrafter (Recurrent Drafter) speculative decoding for Hugging Face causal LMs."""

from .api import Generation, ReDrafter
from .drafter import DrafterConfig, RecurrentDrafter
from .errors import RedrafterError

__all__ = ["DrafterConfig", "Generation", "ReDrafter", "RecurrentDrafter", "RedrafterError"]
__version__ = "0.1.0"
