"""predictq producer: send numpy arrays to the prediction queue, get numpy arrays back.

>>> from producer import PredictionClient
>>> client = PredictionClient()            # PREDICTQ_BROKER_URL / PREDICTQ_RESULT_BACKEND
>>> probs = client.predict(x, timeout=30)  # x: np.ndarray, first dimension = batch
>>> probs = await client.apredict(x, timeout=30)  # the same from asyncio code

This package never imports TensorFlow.
"""

from predictq.errors import (
    BrokerUnavailable,
    ConfigError,
    DeadlineExceeded,
    DeviceOutOfMemory,
    InvalidInput,
    InvalidMessage,
    ModelLoadError,
    ModelNotReady,
    PayloadTooLarge,
    PoisonJob,
    PredictionError,
    PredictqError,
    QueueFull,
    ResultTimeout,
    TooManyInFlight,
    UnknownModel,
    WorkerLost,
)
from predictq.settings import Settings
from producer.client import PredictionClient
from producer.job import Job

__all__ = [
    "BrokerUnavailable",
    "ConfigError",
    "DeadlineExceeded",
    "DeviceOutOfMemory",
    "InvalidInput",
    "InvalidMessage",
    "Job",
    "ModelLoadError",
    "ModelNotReady",
    "PayloadTooLarge",
    "PoisonJob",
    "PredictionClient",
    "PredictionError",
    "PredictqError",
    "QueueFull",
    "ResultTimeout",
    "Settings",
    "TooManyInFlight",
    "UnknownModel",
    "WorkerLost",
]
