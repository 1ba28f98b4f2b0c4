"""Typed training settings. The defaults live in `defaults.yaml` (one commented file); this module
validates them, applies overrides and rejects unknown keys with a suggestion."""

from __future__ import annotations

import contextlib
import difflib
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .preprocess import PreprocessSpec


class TrainConfig(BaseModel):
    """Resolved training configuration (saved next to every checkpoint)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("data", mode="before")
    @classmethod
    def _one_or_many(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v

    data: list[str] | None = None
    source_weights: dict[str, float] | None = None
    source_balance: float = Field(default=1.0, ge=0.0, le=1.0)
    diagnosis_balance: float = Field(default=1.0, ge=0.0, le=1.0)
    samples_per_epoch: int | None = Field(default=None, gt=0)
    exclude_sources: list[str] | None = None
    exclude_patients: str | None = None
    folds: int | None = Field(default=None, ge=2, le=20)
    val_fraction: float = Field(gt=0.0, lt=0.5)
    seed: int
    split_seed: int | None = None
    limit: int | None = Field(default=None, gt=0)
    arch: Literal["efficientnet-lite0", "efficientnet-lite1"]
    image_size: int = Field(ge=64, le=512)
    dropout: float = Field(ge=0.0, lt=1.0)
    diagnosis_weight: float = Field(default=0.0, ge=0.0)
    color_constancy: Literal["none", "shades-of-gray"]
    input_mask: Literal["none", "disc"] = "none"
    epochs: int = Field(ge=1)
    small_size: int | None = Field(default=None, ge=64, le=512)
    small_epochs: int = Field(default=0, ge=0)
    batch_size: int = Field(ge=2)
    lr: float = Field(gt=0.0)
    warmup_epochs: int = Field(ge=0)
    weight_decay: float = Field(ge=0.0)
    label_smoothing: float = Field(ge=0.0, lt=0.5)
    patience: int = Field(ge=1)
    augment: Literal["none", "standard", "phone"]
    stamp_augment: float = Field(default=0.0, ge=0.0, le=1.0)
    stamp_consistency: float = Field(default=0.0, ge=0.0)
    stamps_from: str | None = None
    workers: int = Field(ge=0)
    device: Literal["cpu", "cuda", "auto"]
    threads: int | None = Field(default=None, ge=1)
    target_sensitivity: float = Field(gt=0.5, le=1.0)

    @model_validator(mode="after")
    def _consistency_needs_marks(self) -> TrainConfig:
        if self.stamp_consistency > 0 and not self.stamp_augment:
            raise ValueError(
                "stamp_consistency needs stamp_augment > 0 (the marked draws it compares with their twins)"
            )
        return self

    @model_validator(mode="after")
    def _small_epochs_fit(self) -> TrainConfig:
        if self.small_epochs and (self.small_size is None or self.small_size >= self.image_size):
            raise ValueError(
                f"small_epochs needs small_size under image_size ({self.image_size}): the early epochs train smaller"
            )
        if self.small_epochs >= self.epochs:
            raise ValueError(
                f"small_epochs ({self.small_epochs}) must be fewer than epochs ({self.epochs}): the last epochs "
                f"train at image_size, the size the model predicts at"
            )
        return self

    def preprocess_spec(self) -> PreprocessSpec:
        """The preprocessing these settings train with; export copies it into the model card."""
        return PreprocessSpec(size=self.image_size, color_constancy=self.color_constancy, mask=self.input_mask)

    @property
    def split_seed_used(self) -> int:
        """The seed of the validation split and the folds: `split_seed`, else `seed`."""
        return self.seed if self.split_seed is None else self.split_seed


def default_values() -> dict[str, Any]:
    """The defaults as written in `defaults.yaml`."""
    text = resources.files("skinscan").joinpath("defaults.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn `key=value` strings into a dict; values are parsed as YAML scalars (`lr=1e-3`, `limit=null`)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {pair!r} is not of the form key=value, e.g. --set epochs=10")
        parsed = yaml.safe_load(value) if value.strip() else None
        if isinstance(parsed, str):  # YAML 1.1 reads "1e-3" as a string
            with contextlib.suppress(ValueError):
                parsed = float(parsed)
        out[key.strip()] = parsed
    return out


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the YAML file at `path`, then `overrides`; unknown keys fail with a suggestion."""
    values = default_values()
    layers: list[dict[str, Any]] = []
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping of key: value lines")
        layers.append(loaded)
    layers.append(overrides or {})
    for layer in layers:
        for key, value in layer.items():
            if key not in values:
                close = difflib.get_close_matches(key, values, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(values)}"
                raise ConfigError(f"unknown setting '{key}'{hint}")
            values[key] = value
    try:
        return TrainConfig(**values)
    except ValidationError as exc:
        problems = "; ".join(
            (f"{'.'.join(map(str, e['loc']))}: " if e["loc"] else "") + e["msg"].removeprefix("Value error, ")
            for e in exc.errors()
        )
        raise ConfigError(f"invalid setting: {problems}") from None
