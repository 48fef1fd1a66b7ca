"""ViPO: RL post-training (GRPO / ViPO) of diffusers flow-matching generators, with
perceptual structuring (vipo.psm) and the training loop (vipo.train).

Kept import-light on purpose: ``import vipo`` must not pull in diffusers or transformers
(8-9 s each); each part imports them where it needs them.
"""

__version__ = "0.1.0"
