"""Training-time augmentation presets (albumentations), applied to the uint8 pixels that
`preprocess.load_pixels` returns and before `preprocess.normalise`."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def build_augment(preset: str, size: int) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    """Return `aug(pixels, rng) -> pixels` for the named preset ('none' or 'standard')."""
    if preset == "none":
        return lambda pixels, rng: pixels
    if preset != "standard":
        raise ValueError(f"unknown augmentation preset {preset!r}")
    import albumentations as A

    pipeline = A.Compose(
        [
            A.RandomResizedCrop(size=(size, size), scale=(0.55, 1.0), ratio=(0.8, 1.25), p=1.0),
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.RandomRotate90(p=0.5),
            A.Affine(rotate=(-30, 30), border_mode=2, p=0.5),  # cv2.BORDER_REFLECT
            A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.03, p=0.8),
            A.OneOf([A.GaussianBlur(blur_limit=(3, 5)), A.MotionBlur(blur_limit=(3, 7))], p=0.2),
            A.GaussNoise(std_range=(0.01, 0.05), p=0.2),
            A.ImageCompression(quality_range=(50, 95), p=0.3),
        ],
        seed=None,
    )

    def aug(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        pipeline.set_random_seed(int(rng.integers(2**31 - 1)))
        return pipeline(image=pixels)["image"]

    return aug
