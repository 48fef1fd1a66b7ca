"""Latent shapes of the presets the benchmarks time (the fused loss issue's sizes)."""

SHAPES = {
    "flux-512px-g12": (12, 16, 64, 64),  # FLUX at 512 px, group of 12
    "wan-240x416-53f": (8, 16, 14, 30, 52),  # Wan 2.1 at 240x416, 53 frames -> 14 latent frames
}
