"""Typed errors shared by the CLI and the server.

Each error knows how the CLI should exit; the HTTP layer (issue #5) adds status, OpenAI
``type``/``code`` and headers on its own subclasses. Messages tell the operator what to do.
"""

from __future__ import annotations


class NodeAgentError(Exception):
    """Base class: an error the agent explains instead of a traceback."""

    exit_code = 1


class UsageError(NodeAgentError):
    """Bad input from the operator (config, model reference, flags): exit 2."""

    exit_code = 2


class ConfigError(UsageError):
    """The settings file or environment holds an invalid value."""


class ProfileError(UsageError):
    """A hardware profile is missing or does not match the profile schema."""


class ModelError(UsageError):
    """A model reference cannot be resolved or its description is missing or garbled."""


class PlanError(UsageError):
    """A pinned choice breaks a hard constraint (e.g. TP must divide the attention heads)."""
