"""Training-time augmentation presets (albumentations), applied to the uint8 pixels that
`preprocess.load_pixels` returns and before `preprocess.normalise` (which applies colour constancy)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

PRESETS = ("none", "standard", "phone")


def _geometric(size: int, phone: bool) -> list:
    import albumentations as A
    import cv2

    ops = [
        A.RandomResizedCrop(size=(size, size), scale=(0.55, 1.0), ratio=(0.8, 1.25), p=1.0),
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.RandomRotate90(p=0.5),
        A.Affine(rotate=(-30, 30), border_mode=cv2.BORDER_REFLECT_101, p=0.5),
    ]
    if phone:
        ops += [
            # zoom out: the lesion becomes small inside a larger field of (edge-extended) skin, as in a phone frame
            A.Affine(scale=(0.45, 1.0), border_mode=cv2.BORDER_REPLICATE, p=0.4),
            A.Perspective(scale=(0.02, 0.08), p=0.3),
        ]
    return ops


def _photometric(phone: bool) -> list:
    import albumentations as A

    if not phone:
        return [
            A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.03, p=0.8),
            A.OneOf([A.GaussianBlur(blur_limit=(3, 5)), A.MotionBlur(blur_limit=(3, 7))], p=0.2),
            A.GaussNoise(std_range=(0.01, 0.05), p=0.2),
            A.ImageCompression(quality_range=(50, 95), p=0.3),
        ]
    return [
        A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.03, p=0.6),
        A.PlanckianJitter(p=0.3),  # white balance of another light source
        A.RandomBrightnessContrast(brightness_limit=0.25, contrast_limit=0.25, p=0.4),  # exposure
        A.RandomGamma(gamma_limit=(70, 140), p=0.3),
        A.RandomShadow(p=0.15),
        A.RandomSunFlare(src_radius=60, num_flare_circles_range=(1, 3), p=0.05),  # glare
        A.OneOf([A.Defocus(radius=(1, 3)), A.MotionBlur(blur_limit=(3, 9)), A.GaussianBlur(blur_limit=(3, 7))], p=0.35),
        A.OneOf([A.ISONoise(), A.GaussNoise(std_range=(0.02, 0.08))], p=0.3),
        A.Downscale(scale_range=(0.4, 0.9), p=0.2),
        A.ImageCompression(quality_range=(30, 92), p=0.5),
    ]


class Augment:
    """`aug(pixels, rng) -> pixels`: one training draw's augmentation (`build_augment`). `aug.pair(pixels, rng)`
    draws the same and also returns the photo's clean twin when a mark was pasted: the same photo through the
    same geometric and photometric draw without the mark (None when no mark was pasted), for training's
    `stamp_consistency`. Both consume `rng` alike, so a run's draws do not depend on asking for twins."""

    def __init__(self, pipeline, stamps: Mapping[str, Any] | None, stamp_p: float):
        self.pipeline, self.stamps, self.stamp_p = pipeline, stamps, stamp_p

    def pair(self, pixels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
        return self._draw(pixels, rng, twin=True)

    def __call__(self, pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self._draw(pixels, rng, twin=False)[0]

    def _draw(self, pixels: np.ndarray, rng: np.random.Generator, twin: bool) -> tuple[np.ndarray, np.ndarray | None]:
        clean = pixels
        stamped = self.stamp_p > 0 and rng.random() < self.stamp_p
        if stamped:
            from .shortcuts import random_stamp

            pixels = random_stamp(pixels, self.stamps, rng)
        twin = twin and stamped
        if self.pipeline is None:
            return pixels, clean if twin else None
        seed = int(rng.integers(2**31 - 1))
        self.pipeline.set_random_seed(seed)
        out = self.pipeline(image=pixels)["image"]
        if not twin:
            return out, None
        self.pipeline.set_random_seed(seed)
        return out, self.pipeline(image=clean)["image"]


def build_augment(preset: str, size: int, stamps: Mapping[str, Any] | None = None, stamp_p: float = 0.0) -> Augment:
    """Return `aug(pixels, rng) -> pixels` (an `Augment`) for a preset in PRESETS. With `stamps` (name -> RGBA
    image, `skinscan.stamps.build_stamps`), a share `stamp_p` of the draws first gets one of them pasted at
    random (`shortcuts.random_stamp`: counterfactual augmentation, so that no source's mark predicts the label)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown augmentation preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if preset == "none":
        pipeline = None
    else:
        import albumentations as A

        phone = preset == "phone"
        pipeline = A.Compose([*_geometric(size, phone), *_photometric(phone)], seed=None)
    if stamp_p > 0 and not stamps:
        raise ValueError("stamp augmentation needs the stamps (skinscan.stamps.build_stamps)")
    return Augment(pipeline, stamps, stamp_p)
