"""Training settings: defaults from one file, typed overrides, and errors that say how to fix them."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from skinscan.config import TrainConfig, default_values, load_config, parse_overrides
from skinscan.errors import ConfigError


def test_defaults_load_and_match_the_defaults_file() -> None:
    cfg = load_config()

    assert isinstance(cfg, TrainConfig)
    assert cfg.model_dump() == default_values()
    assert set(TrainConfig.model_fields) == set(default_values()), "every setting has its default in defaults.yaml"


def test_defaults_are_sane_for_the_documented_operating_point() -> None:
    cfg = load_config()
    assert cfg.target_sensitivity == 0.95
    assert cfg.arch == "efficientnet-lite0"
    assert cfg.image_size == 224
    assert cfg.data is None and cfg.limit is None


def test_config_is_frozen() -> None:
    with pytest.raises(ValidationError):
        load_config().epochs = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [("epoch", "epochs"), ("batchsize", "batch_size"), ("sead", "seed"), ("image-size", "image_size")],
)
def test_unknown_key_suggests_the_closest(key: str, suggestion: str) -> None:
    with pytest.raises(ConfigError, match=f"unknown setting '{key}'; did you mean '{suggestion}'"):
        load_config(overrides={key: 1})


def test_unknown_key_without_a_close_match_lists_the_known_keys() -> None:
    with pytest.raises(ConfigError, match=r"known keys: .*epochs") as info:
        load_config(overrides={"zzzqqq": 1})
    assert "did you mean" not in str(info.value)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("lr", -1),
        ("epochs", 0),
        ("val_fraction", 0.7),
        ("arch", "resnet50"),
        ("augment", "heavy"),
        ("batch_size", "many"),
        ("input_mask", "oval"),
    ],
)
def test_invalid_value_names_the_field(key: str, value) -> None:
    with pytest.raises(ConfigError, match=f"invalid setting: {key}:"):
        load_config(overrides={key: value})


def test_parse_overrides_types_the_values() -> None:
    # the docstring's own example; YAML 1.1 (PyYAML) reads a float without a dot, like 1e-3, as a string
    parsed = parse_overrides(["lr=1e-3", "weight_decay=5e-4", "limit=null"])

    assert parsed == {"lr": 0.001, "weight_decay": 0.0005, "limit": None}
    assert isinstance(parsed["lr"], float), f"lr=1e-3 parsed as {parsed['lr']!r}"


@pytest.mark.parametrize(
    ("pair", "key", "value"),
    [
        ("epochs=10", "epochs", 10),
        ("lr=0.0003", "lr", 0.0003),
        ("limit=", "limit", None),
        ("augment=none", "augment", "none"),
        ("data=../shared/datasets/isic-mvb", "data", "../shared/datasets/isic-mvb"),
        (" seed = 7", "seed", 7),
    ],
)
def test_parse_overrides_values(pair: str, key: str, value) -> None:
    parsed = parse_overrides([pair])
    assert parsed == {key: value}
    assert type(parsed[key]) is type(value)


@pytest.mark.parametrize("pair", ["epochs", "=3", " =3"])
def test_parse_overrides_rejects_malformed_pairs(pair: str) -> None:
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides([pair])


def test_overrides_reach_the_config() -> None:
    cfg = load_config(overrides=parse_overrides(["lr=1e-3", "epochs=2", "limit=64"]))
    assert (cfg.lr, cfg.epochs, cfg.limit) == (0.001, 2, 64)


def test_the_preprocessing_settings_reach_the_spec_the_card_records() -> None:
    assert load_config().preprocess_spec().mask == "none"
    cfg = load_config(
        overrides=parse_overrides(["input_mask=disc", "color_constancy=shades-of-gray", "image_size=192"])
    )
    spec = cfg.preprocess_spec()
    assert (spec.mask, spec.color_constancy, spec.size) == ("disc", "shades-of-gray", 192)


def test_config_file_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 4\nbatch_size: 16\n")

    cfg = load_config(path, {"epochs": 6})

    assert cfg.batch_size == 16
    assert cfg.epochs == 6, "overrides win over the file"
    assert cfg.lr == default_values()["lr"]


def test_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- epochs\n- 3\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "typo.yaml").write_text("epoch: 3\n")
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        load_config(tmp_path / "typo.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(tmp_path / "empty.yaml") == load_config()


def test_progressive_resizing_settings_are_checked_together() -> None:
    cfg = load_config(overrides={"epochs": 12, "small_size": 160, "small_epochs": 9})
    assert (cfg.small_size, cfg.small_epochs) == (160, 9)
    assert cfg.preprocess_spec().size == cfg.image_size  # prediction always runs at image_size
    with pytest.raises(ConfigError, match=r"^invalid setting: small_epochs needs small_size under image_size \(224\)"):
        load_config(overrides={"small_epochs": 2})
    with pytest.raises(ConfigError, match=r"^invalid setting: small_epochs needs small_size under image_size"):
        load_config(overrides={"small_epochs": 2, "small_size": 224})
    with pytest.raises(ConfigError, match=r"^invalid setting: small_epochs \(15\) must be fewer than epochs \(15\)"):
        load_config(overrides={"small_epochs": 15, "small_size": 160})
