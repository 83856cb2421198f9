"""simba-compress: post-hoc token pruning (Simba) for pretrained Mamba language models."""

__version__ = "0.1.0"

from .checkpoints import load, load_tokenizer, save
from .errors import SimbaError
from .model import MambaLM, ModelConfig
from .pruning import SimbaConfig

__all__ = ["load", "load_tokenizer", "save", "SimbaError", "MambaLM", "ModelConfig", "SimbaConfig", "__version__"]
