"""Evaluation tasks (lm-eval 0.4 protocols on local files, plus the synthetic test sets).

Use :func:`get_task` / :func:`list_tasks`; see :mod:`moelab.eval.tasks.base` for the interface.
"""

from .base import GenerationRequest, GenerationTask, LoglikelihoodRequest, MultipleChoiceTask, Task
from .registry import get_task, list_tasks

__all__ = [
    "GenerationRequest",
    "GenerationTask",
    "LoglikelihoodRequest",
    "MultipleChoiceTask",
    "Task",
    "get_task",
    "list_tasks",
]
