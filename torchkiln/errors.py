"""The typed error hierarchy.

Every error torchkiln raises on purpose is a :class:`KilnError`. Each carries the thing at fault
(``where``: a node, module path, config key or file) and a ``hint`` saying how to fix it, so the CLI
can print one clear line instead of a traceback from deep inside torch or onnx.
"""

from __future__ import annotations


class KilnError(Exception):
    """Base class of every error torchkiln raises deliberately."""

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.where = where
        self.hint = hint

    def __str__(self) -> str:
        text = self.message
        if self.where:
            text = f"{text} [at {self.where}]"
        if self.hint:
            text = f"{text}\n  hint: {self.hint}"
        return text


class ConfigError(KilnError):
    """A pass spec, option, backend option or recipe key is unknown or has a bad value."""


class StorageError(ConfigError):
    """A search's study storage cannot be opened (a bad URL, server, user or password) or was lost
    mid-search."""


class InputError(KilnError):
    """Example or call inputs do not match what the model/artifact expects."""


class TraceError(KilnError):
    """The model could not be captured as a graph."""


class PassError(KilnError):
    """A pass failed, broke the graph, or changed the model's outputs beyond tolerance."""


class ExportError(KilnError):
    """The graph could not be exported to the backend format (e.g. ONNX)."""


class BackendError(KilnError):
    """A backend could not build or run an artifact."""


class VerificationError(KilnError):
    """The compiled artifact's outputs differ from the eager model beyond the tolerance."""


class ArtifactError(KilnError):
    """A saved artifact directory is missing, corrupt, or cannot be written."""


class DestinationError(ArtifactError, ConfigError):
    """An output path that may not be written (the current directory, a file, a directory that is
    not ours), refused before any work: the user's configuration to fix (the CLI's exit code 2)."""


class GateError(KilnError):
    """A build met none of its failures but missed a quality gate (accuracy, latency, size)."""


class PipelineError(KilnError):
    """A rank of the pipeline failed, or sent what the partition's boundary schema does not allow."""
