"""simba-compress: post-hoc token pruning (Simba) for pretrained Mamba language models."""

__version__ = "0.1.0"

from .checkpoints import load, load_tokenizer, save
from .compress import compress  # the function (simba_compress.compress the module stays importable by path)
from .data import load_windows
from .errors import SimbaError
from .layers import ModelConfig
from .model import MambaLM
from .pruning import SimbaConfig
from .settings import CalibratedSchedule, ExplicitSchedule, FinetuneConfig, LinearSchedule, PruningSettings

__all__ = [
    "load", "load_tokenizer", "save", "compress", "load_windows", "SimbaError", "MambaLM", "ModelConfig", "SimbaConfig",
    "LinearSchedule", "CalibratedSchedule", "ExplicitSchedule", "PruningSettings", "FinetuneConfig", "__version__",
]
