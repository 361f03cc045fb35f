"""Task registry: look tasks up by name.

``get_task(name, **kwargs)`` constructs the task with ``kwargs`` (e.g. ``data_dir=``,
``num_fewshot=``, or ``docs=`` for the synthetic tasks); an unknown name raises
:class:`~moelab.errors.ConfigError` listing the known ones.
"""

from __future__ import annotations

import inspect
from typing import Any

from ...errors import ConfigError
from .base import Task
from .gsm8k import Gsm8kTask
from .gsm_plus import GsmPlusTask
from .hellaswag import HellaSwagTask
from .synthetic import SyntheticMemorizationTask, SyntheticReasoningTask
from .triviaqa import TriviaQATask

TASKS: dict[str, type[Task]] = {
    cls.name: cls
    for cls in (
        Gsm8kTask,
        GsmPlusTask,
        TriviaQATask,
        HellaSwagTask,
        SyntheticMemorizationTask,
        SyntheticReasoningTask,
    )
}


def list_tasks() -> list[str]:
    """Names of all registered tasks, sorted."""
    return sorted(TASKS)


def get_task(name: str, **kwargs: Any) -> Task:
    """A new instance of the task called ``name``, constructed with ``kwargs``."""
    try:
        cls = TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown eval task {name!r}; choose one of: {', '.join(list_tasks())}") from None
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as e:
        raise ConfigError(f"task {name!r}: bad arguments ({e}); see {cls.__module__}.{cls.__name__}") from None
    return cls(**kwargs)
