"""Tasks: what a run learns (image classification, causal language modelling), one module each.

The contract and the registry are in ``base.py``; importing this package registers the tasks. A run's
task is its dataset's (``DatasetInfo.task``); see ``base.py`` for what a task says.
"""

from .base import Column, Task, TaskError, get_task, list_tasks, register_task, task_of_row  # noqa: F401

# Importing the modules registers their tasks, in this order (classification first: the default).
from . import classification as _classification  # noqa: E402,F401
from . import language_model as _language_model  # noqa: E402,F401
