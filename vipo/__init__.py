"""ViPO trainer: RL post-training (GRPO / ViPO) of diffusers flow-matching generators.

Kept import-light on purpose: ``import vipo`` must not pull in diffusers or transformers
(8-9 s each); the trainer imports them in the phase that needs them.
"""

__version__ = "0.1.0"
