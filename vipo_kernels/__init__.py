"""Fused kernels for ViPO / GRPO post-training of flow-matching generators.

Public API (a contract: extend it, do not rename it)::

    from vipo_kernels import vipo_loss, sde_step, log_prob, sde_coefficients
"""

from .functional import ViPOLoss, log_prob, sde_coefficients, sde_step, vipo_loss
from .reference import (log_prob_reference, sde_coefficients_reference, sde_step_reference,
                        vipo_loss_reference)

__all__ = [
    "vipo_loss", "sde_step", "log_prob", "sde_coefficients", "ViPOLoss",
    "vipo_loss_reference", "sde_step_reference", "log_prob_reference",
    "sde_coefficients_reference",
]
__version__ = "0.1.0"
