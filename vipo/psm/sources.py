"""Where a ViPO run's allocation map comes from: the config value ``psm.map_source``.

    source = load_map_source(cfg.psm, backbone_path, device, prompts)
    maps = source(media, prompts, latent_size)     # (N, *latent_size) in [0, 1], max 1

The sources (docs/method.md, "The arms"):
  psm              the PSM map of the backbone (the paper)
  uniform          all ones: the per-position ratio without a map
  oracle           the object mask that the prompt's toy-world spec renders to, averaged
                   onto the latent grid: a perfect map, for toy-world prompts only
  inverted         1 - the PSM map, rescaled to [0, 1]: the map pointing away from the object
  random_backbone  the PSM map of the backbone's architecture with seed-0 initial weights

Every source returns min-max maps (a constant map becomes all ones) before ``map_norm``,
which the trainer applies in one place for all of them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .maps import minmax

MAP_SOURCES = ("psm", "uniform", "oracle", "inverted", "random_backbone")
NEEDS_BACKBONE = ("psm", "inverted", "random_backbone")


class MapSource:
    def __init__(self, kind: str, psm=None, *, joint_pca: bool = False,
                 temporal_sigma: float = 0.3):
        if kind not in MAP_SOURCES:
            raise ValueError(f"psm.map_source must be one of {', '.join(MAP_SOURCES)}; "
                             f"got {kind!r}")
        if (psm is None) == (kind in NEEDS_BACKBONE):
            raise ValueError(f"map source {kind!r} {'needs' if psm is None else 'takes no'} "
                             f"PSM backbone")
        self.kind, self.psm = kind, psm
        self.joint_pca, self.temporal_sigma = joint_pca, temporal_sigma

    @property
    def failures(self) -> int:
        """Samples whose backbone failed and fell back to an all-ones map."""
        return self.psm.failures if self.psm is not None else 0

    @torch.no_grad()
    def __call__(self, media: torch.Tensor, prompts: list, latent_size) -> torch.Tensor:
        """media (N, 3, h, w) or videos (N, F, 3, h, w) in [0, 1] -> (N, *latent_size) fp32."""
        latent_size = tuple(latent_size)
        if self.kind == "uniform":
            return torch.ones(media.shape[0], *latent_size, device=media.device)
        if self.kind == "oracle":
            return oracle_maps(prompts, media.shape[-1], latent_size).to(media.device)
        if media.dim() == 5:
            maps = self.psm.video(media, latent_size=latent_size, joint_pca=self.joint_pca,
                                  temporal_sigma=self.temporal_sigma).float()
        else:
            maps = self.psm(media, latent_size=latent_size).float()
        if self.kind == "inverted":
            maps = minmax(1.0 - maps, tuple(range(1, maps.dim())))
        return maps


def oracle_maps(prompts: list, image_size: int, latent_size) -> torch.Tensor:
    """(N, H, W): the share of each latent cell that the prompt's rendered object covers
    (its pixel mask averaged over the cell), min-max per sample."""
    from ..toy import world

    if len(latent_size) != 2:
        raise ValueError(f"map_source=oracle is for toy-world images; got latent size "
                         f"{latent_size}")
    masks = world.prompt_masks(list(prompts), image_size).float()[:, None]   # (N, 1, h, w)
    cells = F.adaptive_avg_pool2d(masks, latent_size)[:, 0]
    return minmax(cells, (1, 2))


def check_oracle_prompts(prompts: list) -> None:
    """Start-up check for map_source=oracle: every training prompt is a toy-world prompt."""
    from ..config import ConfigError
    from ..toy import world

    for text in prompts:
        try:
            world.parse_prompt(text)
        except ValueError:
            raise ConfigError(f"psm.map_source=oracle needs toy-world prompts (sample.prompts="
                              f"toy or toy_heldout), whose object masks it renders; got "
                              f"{text!r}") from None


def load_map_source(psm_cfg, backbone_path: str | None, device, prompts: list) -> MapSource:
    """The configured source; the backbone is loaded only for the sources that use it."""
    kind = psm_cfg.map_source
    if kind == "oracle":
        check_oracle_prompts(prompts)
    psm = None
    if kind in NEEDS_BACKBONE:
        from .module import PerceptualStructuringModule

        # normalize="minmax": the trainer applies map_norm itself, after the source.
        psm = PerceptualStructuringModule.from_pretrained(
            backbone_path, device=device, n_components=psm_cfg.n_components,
            aggregation=psm_cfg.aggregation, sigma=psm_cfg.psm_sigma, normalize="minmax",
            random_init=0 if kind == "random_backbone" else None)
    return MapSource(kind, psm, joint_pca=psm_cfg.joint_pca,
                     temporal_sigma=psm_cfg.temporal_sigma)
