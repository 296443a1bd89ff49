"""m4: LLaVA-NeXT-Interleave vision-language models on edge and desktop GPUs."""

from m4.api import Model, ask_together, load
from m4.constraint import Constraint
from m4.errors import M4Error
from m4.runtime.sampling import Sampling
from m4.version import __version__

__all__ = ["load", "Model", "ask_together", "Sampling", "Constraint", "M4Error", "__version__"]
