"""Training augmentation of preprocessed image batches, drawn from a given generator.

:func:`augment_images` works on normalised pixel values ``[B, 3, H, W]`` (what ``ImagePreprocessor`` returns),
so a task can preprocess its images once and augment each step's rows: a random zoom and shift (one affine
warp per row, edges repeated, which keeps the white background of stamps and emoji white), an optional
horizontal flip, and brightness / contrast changes in pixel space. Every random number comes from the
generator, all of them drawn for the whole batch at once, so the same generator state gives the same batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["ImageAugment", "augment_images"]


@dataclass
class ImageAugment:
    """What :func:`augment_images` draws per row (every default is off)."""

    zoom_min: float = 1.0  # zoom factor drawn in [zoom_min, zoom_max]: > 1 crops in, < 1 shows a margin
    zoom_max: float = 1.0
    shift: float = 0.0  # shift of the centre, up to this fraction of the side, in x and y
    flip: float = 0.0  # probability of a horizontal flip (off for captions that say left or right)
    brightness: float = 0.0  # pixel values times a factor in [1 - brightness, 1 + brightness]
    contrast: float = 0.0  # distance to the image's mean times a factor in [1 - contrast, 1 + contrast]

    def check(self, where: str = "augment") -> None:
        if not 0 < self.zoom_min <= self.zoom_max:
            raise ValueError(f"{where}.zoom_min and {where}.zoom_max must satisfy 0 < zoom_min <= zoom_max, "
                             f"got {self.zoom_min} and {self.zoom_max}")
        for key in ("shift", "flip", "brightness", "contrast"):
            v = getattr(self, key)
            if not 0 <= v <= 1:
                raise ValueError(f"{where}.{key} must be in [0, 1], got {v}")

    @property
    def active(self) -> bool:
        return (self.zoom_min, self.zoom_max) != (1.0, 1.0) or any((self.shift, self.flip, self.brightness,
                                                                   self.contrast))


def augment_images(pixels: torch.Tensor, aug: ImageAugment, g: torch.Generator, mean, std) -> torch.Tensor:
    """A new augmented batch of normalised ``pixels`` [B, 3, H, W] (``mean`` / ``std``: the normalisation's,
    per channel); the input itself when ``aug`` changes nothing."""
    if not aug.active:
        return pixels
    b = pixels.shape[0]
    u = torch.rand(b, 6, generator=g, dtype=torch.float64).to(torch.float32)  # every draw of the batch at once
    zoom = aug.zoom_min + (aug.zoom_max - aug.zoom_min) * u[:, 0]
    flip = torch.where(u[:, 1] < aug.flip, -1.0, 1.0)
    shift = aug.shift * 2 * (u[:, 2:4] * 2 - 1)  # affine_grid's coordinates span [-1, 1]: a side is 2
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = flip / zoom
    theta[:, 1, 1] = 1 / zoom
    theta[:, :, 2] = shift
    x = pixels.float()
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if aug.brightness or aug.contrast:
        m = torch.tensor(mean, dtype=x.dtype)[:, None, None]
        s = torch.tensor(std, dtype=x.dtype)[:, None, None]
        raw = x * s + m  # back to [0, 1] pixels
        bright = 1 + aug.brightness * (u[:, 4] * 2 - 1)
        contrast = 1 + aug.contrast * (u[:, 5] * 2 - 1)
        centre = raw.mean(dim=(1, 2, 3), keepdim=True)
        raw = ((raw - centre) * contrast[:, None, None, None] + centre) * bright[:, None, None, None]
        x = (raw.clamp(0, 1) - m) / s
    return x.to(pixels.dtype)
