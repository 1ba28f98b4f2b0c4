"""The few error types skinscan raises. Each message says what went wrong and how to fix it."""

from __future__ import annotations


class SkinscanError(Exception):
    """Base class: every error skinscan raises on purpose is one of these."""


class InvalidImage(SkinscanError):
    """The input cannot be used as an image (not an image, truncated, empty, too many pixels...)."""


class ModelLoadError(SkinscanError):
    """The model file or its model card is missing, unreadable or inconsistent."""


class ConfigError(SkinscanError):
    """A setting is unknown or has an invalid value."""


class DatasetError(SkinscanError):
    """A dataset folder or table is missing or not in a format skinscan reads."""


class InvalidAnswers(SkinscanError):
    """An answer about the lesion (age, body site, yes/no...) is not a valid value, or cannot be used.

    `fields` names the answers at fault (e.g. ("age",)) so that a form can point at them."""

    def __init__(self, message: str, fields: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.fields = tuple(fields)


class MissingExtra(SkinscanError):
    """An optional dependency group (e.g. `train`) is needed but not installed."""

    def __init__(self, extra: str, feature: str, cause: Exception | None = None) -> None:
        detail = f" ({cause})" if cause else ""
        super().__init__(
            f"{feature} needs the '{extra}' extra{detail}. Install it with: pip install 'skinscan[{extra}]'"
        )
