"""The root exception of the detector and its small subclasses: errors a user can cause and fix."""

from __future__ import annotations

__all__ = ["DetectorError", "ConfigError", "DataError", "ModelError"]


class DetectorError(Exception):
    """An error a user can cause; its message is one clear line naming what is wrong and what would be right."""


class ConfigError(DetectorError):
    """The configuration file is missing, unreadable or invalid; `problems` lists every error found."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__("\n".join(f"{path}: {p}" for p in problems))


class DataError(DetectorError):
    """A data file is missing, unreadable, or lacks the columns it was asked for."""


class ModelError(DetectorError):
    """A model folder is missing, incomplete, or does not fit the data or configuration."""
