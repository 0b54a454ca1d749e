"""predictq workers: the Celery app that serves a Keras model.

``celery -A workers worker --pool threads`` finds ``app`` here; importing this
package registers the tasks and the model-loading signal handlers. It does not
import Keras or its backend (TensorFlow, JAX, PyTorch): that happens in the worker
process when the model loads, after the backend is chosen (workers/backends/).
"""

from workers import signals as _signals  # noqa: F401  (connects the handlers)
from workers import tasks as _tasks  # noqa: F401  (registers the tasks)
from workers.app import app

__all__ = ["app"]
