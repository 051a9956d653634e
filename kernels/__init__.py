"""Triton kernels of the V-JEPA step, each with a pure-PyTorch reference that is its specification.

Every op takes `impl=None|"triton"|"torch"`; None is the configured default (`set_default_impl`, env VJEPA_KERNELS;
see `kernels.dispatch`). Set TRITON_INTERPRET=1 before importing this package to run the kernels on a CPU.
"""

from .dispatch import set_default_impl
from .ema import ema_
from .l1_loss import masked_l1_loss
from .tubelet_embed import masked_tubelet_embed
from .varlen_attention import varlen_attention

__all__ = ["ema_", "masked_l1_loss", "masked_tubelet_embed", "set_default_impl", "varlen_attention"]
