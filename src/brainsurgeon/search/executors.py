"""Executors for the database build, all behind ``concurrent.futures.Executor``: submit -> Future.

* ``inline`` (default): runs each task at submit time in this process (no copies, no pickling).
* ``process``: a spawn-context process pool (tasks and results are pickled; one torch thread each).
* ``ray``: Ray tasks (``pip install 'brainsurgeon[ray]'``); ``ray.init()`` locally or on a cluster
  (``RAY_ADDRESS``), the same code path either way.

    >>> with make_executor("process", workers=2) as ex:
    ...     fut = ex.submit(pow, 2, 10)
    >>> fut.result()
    1024
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from typing import Any

from ..errors import ConfigError, MissingDataError

EXECUTORS = ("inline", "process", "ray")


class InlineExecutor(Executor):
    """Runs every task immediately in the calling thread; exceptions land in the Future.

    >>> InlineExecutor().submit(sum, [1, 2]).result()
    3
    """

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except Exception as e:  # noqa: BLE001  (delivered through the Future, like any executor)
            fut.set_exception(e)
        return fut


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


class RayExecutor(Executor):
    """Each submit becomes a Ray task; ``ray.init()`` is called if Ray is not running yet.

    >>> with RayExecutor() as ex:
    ...     ex.submit(pow, 2, 3).result()
    8
    """

    def __init__(self, num_cpus_per_task: float = 1.0, **init_kwargs: Any) -> None:
        try:
            import ray
        except ModuleNotFoundError as e:
            raise MissingDataError("the ray executor needs Ray: `pip install 'brainsurgeon[ray]'` "
                                   "(or use executor='process')") from e
        self._ray = ray
        self._started = not ray.is_initialized()
        if self._started:
            ray.init(**init_kwargs)
        self._opts = {"num_cpus": num_cpus_per_task}

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        task = self._ray.remote(**self._opts)(fn)
        return task.remote(*args, **kwargs).future()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if self._started:
            self._ray.shutdown()
            self._started = False


def make_executor(kind: str | Executor = "inline", workers: int = 2) -> Executor:
    """An executor by name ("inline", "process", "ray"); an Executor instance is returned as is.

    >>> make_executor("inline")
    <brainsurgeon.search.executors.InlineExecutor object at ...>
    """
    if isinstance(kind, Executor):
        return kind
    if kind == "inline":
        return InlineExecutor()
    if kind == "process":
        if workers < 1:
            raise ConfigError(f"executor 'process': workers must be >= 1, got {workers}")
        return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker)
    if kind == "ray":
        return RayExecutor()
    raise ConfigError(f"unknown executor {kind!r}; use one of {list(EXECUTORS)} or pass a "
                      f"concurrent.futures.Executor")
