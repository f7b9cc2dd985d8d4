"""Errors for bad input. The CLI turns every ``InputError`` into one line and exit code 2."""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input (file, key, shape or option). Nothing has been written or changed."""


class DeltaError(InputError):
    """A weight delta that cannot be used with this model."""
