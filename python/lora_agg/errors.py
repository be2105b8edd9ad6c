"""Exceptions raised by the bindings.

A plugin's failure keeps the plugin's own one-line message and its
``lora_agg_status``; each status has its own subclass so callers can catch
exactly the case they handle (``except lora_agg.UnsupportedError``).
"""

from __future__ import annotations

from ._abi import Status


class LoraAggError(Exception):
    """Base class of every lora_agg error."""


class AggregationError(LoraAggError):
    """A plugin (or the input check before it) refused a call.

    ``status`` is the ABI status, ``message`` the plugin's one-line message.
    """

    status: Status = Status.INTERNAL_ERROR

    def __init__(self, message: str, status: Status | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = Status(status)

    def __str__(self) -> str:
        return self.message


class InvalidInputError(AggregationError):
    """The round or a client is malformed (shapes, NaN/Inf, no clients, zero samples)."""

    status = Status.INVALID_INPUT


class UnsupportedError(AggregationError):
    """Valid input the strategy does not handle (for example heterogeneous ranks)."""

    status = Status.UNSUPPORTED


class InvalidConfigError(AggregationError):
    """The hyperparameters given to ``create`` are invalid."""

    status = Status.INVALID_CONFIG


class InvalidStateError(AggregationError):
    """Saved state could not be restored."""

    status = Status.INVALID_STATE


class InternalError(AggregationError):
    """The plugin failed for a reason of its own."""

    status = Status.INTERNAL_ERROR


_BY_STATUS = {cls.status: cls for cls in
              (InvalidInputError, UnsupportedError, InvalidConfigError, InvalidStateError, InternalError)}


def error_for_status(status: int, message: str) -> AggregationError:
    """The exception for an ABI status; unknown statuses become :class:`InternalError`."""
    try:
        known = Status(status)
    except ValueError:
        return InternalError(f"{message} (unrecognized status {status})")
    cls = _BY_STATUS.get(known, InternalError)
    return cls(message, known)


class PluginLoadError(LoraAggError):
    """A plugin could not be found, loaded or chosen.

    ``kind`` names the case, as the Swift ``LoaderError`` does: ``path-missing``,
    ``not-shared-object``, ``missing-entry-symbol``, ``abi-mismatch``,
    ``descriptor-too-small``, ``missing-field``, ``invalid-metadata``,
    ``duplicate-name``, ``unknown-strategy``, ``no-plugins-found``.
    """

    def __init__(self, kind: str, message: str, path: str | None = None):
        super().__init__(message)
        self.kind = kind
        self.path = path
