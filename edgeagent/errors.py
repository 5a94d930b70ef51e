"""Errors that carry a message meant for the operator: what failed, why, what to do."""


class EdgeAgentError(Exception):
    """Base of every error whose message is shown to a person as it is (no traceback)."""


class ConfigError(EdgeAgentError):
    """The configuration file is missing, unreadable or does not validate."""


class MissingDependencyError(EdgeAgentError):
    """An optional backend needs a package that is not installed; the message names it."""

    def __init__(self, what: str, install_hint: str) -> None:
        super().__init__(f"{what} is not available: {install_hint}")
        self.install_hint = install_hint


class SourceError(EdgeAgentError):
    """A camera or sensor could not be opened or stopped delivering samples."""


class ModelError(EdgeAgentError):
    """A model file is missing, is not a TFLite model, or cannot run here."""


class AcceleratorError(EdgeAgentError):
    """An accelerator is absent, or present but broken; the message says which."""
