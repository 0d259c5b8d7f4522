"""The one error type of recipes: a ``ConfigError`` names the key and how to fix it."""

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A recipe or override is wrong; the message names the key and how to fix it."""
