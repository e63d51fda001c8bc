"""Experiment presets shipped with the package (``gradnorm_al/presets/<name>.yaml``)."""

from __future__ import annotations

from importlib import resources
from typing import Any

import yaml

from ..errors import UnknownNameError
from .config import ExperimentConfig


def _files() -> dict[str, Any]:
    folder = resources.files("gradnorm_al") / "presets"
    return {
        entry.name[: -len(".yaml")]: entry
        for entry in folder.iterdir()
        if entry.name.endswith(".yaml")
    }


def _values(name: str) -> dict[str, Any]:
    files = _files()
    if name not in files:
        raise UnknownNameError(
            f"unknown preset {name!r}; known presets: {', '.join(sorted(files))}"
        )
    return yaml.safe_load(files[name].read_text(encoding="utf-8"))


def preset_names() -> list[str]:
    return sorted(_files())


def preset_description(name: str) -> str:
    return str(_values(name).get("description", ""))


def load_preset(name: str, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """The preset's configuration (its ``description`` dropped), updated with ``overrides``."""
    values = {k: v for k, v in _values(name).items() if k != "description"}
    config = ExperimentConfig.from_dict(values)
    return ExperimentConfig.from_dict(overrides, config) if overrides else config
