"""ViPO trainer package: perceptual structuring (vipo.psm) and the training loop."""
