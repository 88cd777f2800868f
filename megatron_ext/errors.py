"""The config error every layer of the project raises, and its one-line check."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value is invalid; the message names the field and says what to change."""


def require(condition: bool, field: str, message: str) -> None:
    """Raise :class:`ConfigError` naming ``field`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{field}: {message}")
