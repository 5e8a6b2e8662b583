"""The base of every recipe section, and the error a wrong recipe raises."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from attnpipe.errors import AttnpipeError


class ConfigError(AttnpipeError, ValueError):
    """A recipe or project setting is wrong; the message says which and how to fix it."""


class Strict(BaseModel):
    """Base for every config section: unknown keys are errors, objects are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)
