"""simba-compress: post-hoc token pruning (Simba) for pretrained Mamba language models."""

__version__ = "0.1.0"

from .checkpoints import load, load_tokenizer, save
from .compress import compress  # the function (simba_compress.compress the module stays importable by path)
from .errors import SimbaError
from .layers import ModelConfig
from .model import MambaLM
from .pruning import SimbaConfig

__all__ = ["load", "load_tokenizer", "save", "compress", "SimbaError", "MambaLM", "ModelConfig", "SimbaConfig", "__version__"]
