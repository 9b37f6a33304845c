"""Task kinds: one object each, the one place a task is spelled out.

Adding a task kind is a module here with a :class:`Task` subclass and one line in
:data:`TASKS`; the config's ``task`` key, the plan, the hosts, the output writer, the
online endpoint and ``evaluate`` all ask the object instead of testing the name.
"""

from __future__ import annotations

from actors.tasks.base import (
    CASCADE_FIELD,
    HeadInfo,
    HeadMismatch,
    MemberSpec,
    OutputField,
    Scored,
    Task,
)
from actors.tasks.classification import ClassificationTask
from actors.tasks.embedding import EmbeddingTask
from actors.tasks.token_classification import TokenClassificationTask

__all__ = [
    "TASKS",
    "HeadInfo",
    "HeadMismatch",
    "MemberSpec",
    "OutputField",
    "Scored",
    "Task",
    "all_output_names",
    "get_task",
]

# The registry: the config key `task` takes these names.
TASKS: dict[str, Task] = {
    t.name: t for t in (ClassificationTask(), EmbeddingTask(), TokenClassificationTask())
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"'{name}' is not a task; use one of {list(TASKS)}") from None


def all_output_names() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Every task's ensemble output columns and member column prefixes: an input column
    with one of these names would be mistaken for the scorer's."""
    names: dict[str, None] = {"error": None, CASCADE_FIELD.name: None}
    prefixes: dict[str, None] = {}
    for task in TASKS.values():
        names.update(dict.fromkeys(f.name for f in task.fields if not f.member))
        prefixes.update(dict.fromkeys(task.member_prefixes()))
    return tuple(names), tuple(prefixes)
