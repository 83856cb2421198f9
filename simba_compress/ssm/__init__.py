"""The SSM math: reference scan and global-impact score (PyTorch), and GPU kernels where available."""

from .scan import selective_scan, selective_step
from .score import channel_share, global_impact, step_norm

__all__ = ["selective_scan", "selective_step", "global_impact", "channel_share", "step_norm"]
