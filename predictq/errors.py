"""The predictq exception hierarchy, shared by producers and workers.

Every error a job can end with is one of these classes. They travel through the
Celery result backend as ``(exc_module, exc_type, args)``; Celery rebuilds them
on the producer side only when this module is already imported there
(``celery.backends.base.exception_to_python`` looks the module up in
``sys.modules``), which ``producer`` guarantees. So each class takes exactly one
positional argument, the message, and nothing else: anything richer would be
lost on the wire.

Retryable vs fatal is explicit in the class attribute ``retryable``: it tells a
caller whether submitting the same job again may succeed.
"""

from __future__ import annotations


class PredictqError(Exception):
    """Base class of every error raised by predictq."""

    retryable: bool = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(PredictqError, ValueError):
    """A setting is missing or has an invalid value."""


class InvalidInput(PredictqError, ValueError):
    """The job's input does not match what the model expects; never retried."""


class PayloadTooLarge(InvalidInput):
    """The encoded job is larger than ``PREDICTQ_MAX_PAYLOAD_BYTES``."""


class InvalidMessage(InvalidInput):
    """The broker message itself was unreadable (content type, encoding, headers)."""


class UnknownModel(InvalidInput):
    """The job names a model, or pins a version, that the serving workers do not have."""


class ModelNotReady(PredictqError):
    """The worker process has no loaded, warmed model yet."""

    retryable = True


class ModelLoadError(PredictqError):
    """The model file could not be loaded or has no usable input spec."""


class PredictionError(PredictqError):
    """The model raised while computing a prediction."""


class DeviceOutOfMemory(PredictionError):
    """The job does not fit in device memory even when run alone, one sample at a time."""


class DeadlineExceeded(PredictqError):
    """The job's deadline passed before it could run; it was not run."""


class PoisonJob(PredictqError):
    """The job killed its worker process on every attempt and was given up."""


class BrokerUnavailable(PredictqError):
    """Redis could not be reached before the submit deadline; the job was not sent."""

    retryable = True


class Requeue(PredictqError):
    """Internal to workers: hand the job back to the queue (it did nothing wrong); no result."""

    retryable = True


class QueueFull(PredictqError):
    """The queue is at ``PREDICTQ_MAX_QUEUE_LENGTH``; the job was not sent."""

    retryable = True


class TooManyInFlight(PredictqError):
    """The producer already has ``max_in_flight`` unfinished jobs; the job was not sent."""

    retryable = True


class ResultTimeout(PredictqError, TimeoutError):
    """No result arrived within the caller's timeout; the job may still finish later."""

    retryable = True


class WorkerLost(PredictqError):
    """The worker died while running the job and the job was not requeued."""

    retryable = True


__all__ = [
    "BrokerUnavailable",
    "ConfigError",
    "DeadlineExceeded",
    "DeviceOutOfMemory",
    "InvalidInput",
    "InvalidMessage",
    "ModelLoadError",
    "ModelNotReady",
    "PayloadTooLarge",
    "PoisonJob",
    "PredictionError",
    "PredictqError",
    "QueueFull",
    "Requeue",
    "ResultTimeout",
    "TooManyInFlight",
    "WorkerLost",
]
