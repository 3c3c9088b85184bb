"""Many tasks, one mechanism: run them here, in local processes, or on Ray (see runner.py)."""
from .runner import InProcess, Processes, Runner, make_runner, map_tasks, runs_here
from .store import TaskStore

__all__ = ["InProcess", "Processes", "Runner", "TaskStore", "make_runner", "map_tasks", "runs_here"]
