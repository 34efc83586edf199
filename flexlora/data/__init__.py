"""Task data: GLUE from the hub or canonical TSV files, and the offline tweets task."""

from flexlora.data.datamodule import TaskDataModule
from flexlora.data.tasks import TASKS, TaskSpec, task_spec

__all__ = ["TASKS", "TaskDataModule", "TaskSpec", "task_spec"]
