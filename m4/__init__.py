"""m4: LLaVA-NeXT-Interleave vision-language models on edge and desktop GPUs."""

from m4.api import Model, load
from m4.errors import M4Error

__version__ = "0.1.0"
__all__ = ["load", "Model", "M4Error", "__version__"]
