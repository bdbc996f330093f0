"""One exception hierarchy for modelpress.

Every error a user can cause is a :class:`ModelpressError`. Errors about what the user
passed in (a path, a name, a config) also subclass :class:`ValueError`; errors about what
happened while working (an export that does not match, a backend that is missing) subclass
:class:`RuntimeError`. Messages say what is wrong, show a valid example and say how to fix it.
The CLI prints the message and exits non-zero without a traceback.
"""

from __future__ import annotations


class ModelpressError(Exception):
    """Base class of every modelpress error."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n{hint}")


# --- what the user asked for ----------------------------------------------------------
class UserInputError(ModelpressError, ValueError):
    """Something the user passed is wrong."""


class ModelNotFoundError(UserInputError):
    """A model path or short name does not resolve to a model."""


class UnsupportedModelError(UserInputError):
    """A model was found but modelpress cannot load it (unknown format or architecture)."""


class UnknownTaskError(UserInputError):
    """A task name is not one modelpress knows."""


class TaskMismatchError(UserInputError):
    """The model does not fit the task (wrong outputs, no tokenizer, ...)."""


class DatasetError(UserInputError):
    """A dataset is missing, unknown, or has the wrong columns."""


class DataNotFoundError(DatasetError):
    """The shared data folder or one of its files is absent."""


class ConfigError(UserInputError):
    """A configuration value is invalid."""


class UnknownRuntimeError(UserInputError):
    """A runtime name is not one modelpress knows."""


class InvalidInputError(UserInputError):
    """An input batch does not match the model's signature."""


# --- what went wrong while working --------------------------------------------------
class ModelpressRuntimeError(ModelpressError, RuntimeError):
    """Something failed while working on a valid request."""


class BackendUnavailableError(ModelpressRuntimeError):
    """An optional backend (onnxruntime, openvino, ...) is not installed."""

    exit_code = 3


class ExportError(ModelpressRuntimeError):
    """An export failed."""


class ParityError(ExportError):
    """An exported model's outputs differ from its source beyond the stated tolerance."""

    def __init__(self, message: str, *, max_abs_diff: float, tolerance: float, hint: str | None = None):
        self.max_abs_diff = max_abs_diff
        self.tolerance = tolerance
        super().__init__(message, hint=hint)


class ArtifactError(ModelpressRuntimeError):
    """An artifact folder is incomplete or its manifest is invalid."""


def require(module: str, extra: str):
    """Import an optional backend or raise a clear :class:`BackendUnavailableError`."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise BackendUnavailableError(
            f"The '{module}' package is needed for this and is not installed ({exc}).",
            hint=f"Install it with: pip install 'modelpress[{extra}]'",
        ) from exc


# --- the model registry ---------------------------------------------------------------
class InvalidNameError(UserInputError):
    """A model name is empty, too long, or has characters that could reach outside the store."""


class InvalidReferenceError(UserInputError):
    """A model reference (NAME, NAME:VERSION, NAME:latest, NAME@stage) cannot be parsed."""


class InvalidStageError(UserInputError):
    """A stage is not one of candidate, staging, production, archived."""


class RegistryNotFoundError(UserInputError):
    """A model, version or stage asked for is not in the registry."""


class RegistryConflictError(UserInputError):
    """The registry refuses a change (deleting a production version, rolling back with no history, ...)."""


class RegistryError(ModelpressRuntimeError):
    """The registry database or its artifact store cannot be used (unreachable, corrupt, foreign)."""


# --- optimize (appended) --------------------------------------------------------------
class UnknownTechniqueError(ConfigError):
    """A technique name, preset or config type has no registered handler."""


class OptimizationError(ModelpressRuntimeError):
    """A technique could not be applied to this model on this runtime."""


class GateFailedError(ModelpressRuntimeError):
    """A recipe step (or every tuner candidate) broke the quality gate."""

    exit_code = 4


# --- serving (appended) ---------------------------------------------------------------
class UnknownServedModelError(ModelNotFoundError):
    """A request names a model (or version) the server has not loaded. HTTP 404."""


class ModelNotReadyError(ModelpressRuntimeError):
    """The model is loading, unloading or the server is draining. HTTP 503."""


class ServerOverloadedError(ModelpressRuntimeError):
    """A model's request queue is full. HTTP 429 with Retry-After."""

    def __init__(self, message: str, *, retry_after_s: int = 1, hint: str | None = None) -> None:
        self.retry_after_s = max(1, int(retry_after_s))
        super().__init__(message, hint=hint)


class RequestTimeoutError(ModelpressRuntimeError):
    """A request did not finish within its timeout. HTTP 504."""


class PayloadTooLargeError(UserInputError):
    """A request body is larger than the server accepts. HTTP 413."""


class UnauthorizedError(UserInputError):
    """A request lacks the API key an endpoint requires, or has a wrong one. HTTP 401."""


# --- rollouts (appended) --------------------------------------------------------------
class RolloutNotFoundError(UserInputError):
    """No rollout or deployment for that model, or a feedback request id the server does not know. HTTP 404."""


class RolloutConflictError(UserInputError):
    """The rollout is not in a state that allows this (a second start, resuming one that runs, ...). HTTP 409."""


# --- serving hardening (appended) -----------------------------------------------------
class UnsupportedMediaTypeError(UserInputError):
    """A POST body is not of a type the endpoint reads (application/json, or the binary tensor type). HTTP 415."""


class ForbiddenError(UserInputError):
    """The server does not allow this request (a load source outside the allow-list, management switched off). HTTP 403."""


class DisallowedHostError(UserInputError):
    """A request to a server bound to a loopback address names another host in its Host header (DNS rebinding). HTTP 400."""


class ServerBusyError(ServerOverloadedError):
    """The server answers as many requests at once as it allows (max_concurrent_requests). HTTP 503 with Retry-After."""


class RequestBodyTimeoutError(UserInputError):
    """A client did not send its whole request body within the server's body-read timeout (a stalled upload). HTTP 408."""
