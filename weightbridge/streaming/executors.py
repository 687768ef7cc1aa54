"""Where shard tasks run: one small adapter per engine behind one seam, `TaskRunner`.

An engine only places (and, for Dask, retries) tasks; the data goes from each worker's source
byte ranges straight to its destination, never through the engine. `runner_for` turns what a
user says (``"processes:4"``, a `concurrent.futures.Executor`, a `dask.distributed.Client`,
``"dask://host:8786"``) into a runner. Dask is imported only when asked for. A Ray adapter
would be one more class with `run` and `close`.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import BrokenExecutor, Executor, Future, ProcessPoolExecutor, as_completed
from typing import Any, Protocol, TypeVar

from weightbridge.errors import ConversionError, WeightbridgeError

T = TypeVar("T")
R = TypeVar("R")

# Per-task retries when none are given: a worker that dies (OOM kill, lost node) takes its
# tasks with it; a task is a whole shard, cheap to redo (and byte-identical), so retry a few
# times (Dask retries on another worker; a process pool of ours is remade).
DEFAULT_RETRIES = 3

_FORMS = (
    "threads, processes, processes:N, dask (with DASK_SCHEDULER_ADDRESS set) or dask://HOST:PORT"
)


class TaskRunner(Protocol):
    """Runs tasks somewhere and hands back their results as they finish."""

    def run(self, fn: Callable[[T], R], tasks: Sequence[T]) -> Iterator[tuple[int, R]]:
        """Yield (position in `tasks`, result) as each task finishes; raise the first failure
        (after cancelling what has not started). Tasks start in the order given."""
        ...

    def close(self) -> None:
        """Release what this runner started (a pool, a client); leave what it was given."""


class FuturesRunner:
    """A `concurrent.futures.Executor` (threads, processes, or anything with `submit`).

    A failed task is submitted again, up to `retries` times. A process pool whose worker died
    (killed for memory, say) is broken for every task in it: when the pool is ours, a new one
    is made and the tasks that had not finished run there; a pool we were given cannot be
    remade, and its failure is raised.
    """

    def __init__(
        self,
        executor: Executor,
        *,
        owned: bool,
        retries: int = 0,
        remake: Callable[[], Executor] | None = None,
    ) -> None:
        self.executor, self.owned, self.retries, self.remake = executor, owned, retries, remake

    def run(self, fn: Callable[[T], R], tasks: Sequence[T]) -> Iterator[tuple[int, R]]:
        tries = dict.fromkeys(range(len(tasks)), 0)
        futures: dict[Future[R], int] = {
            self.executor.submit(fn, t): i for i, t in enumerate(tasks)
        }
        try:
            while futures:
                future = next(as_completed(futures))
                i = futures.pop(future)
                try:
                    result = future.result()
                except BrokenExecutor:
                    if self.remake is None or tries[i] >= self.retries:
                        raise
                    # Every task still in the broken pool fails too: run them all again.
                    pending = [i, *futures.values()]
                    futures.clear()
                    self.executor.shutdown(wait=True, cancel_futures=True)
                    self.executor = self.remake()
                    for j in pending:
                        tries[j] += 1
                        futures[self.executor.submit(fn, tasks[j])] = j
                    continue
                except WeightbridgeError:
                    raise  # bad input or a refusal: the same again on any worker
                except Exception:
                    if tries[i] >= self.retries:
                        raise
                    tries[i] += 1
                    futures[self.executor.submit(fn, tasks[i])] = i
                    continue
                yield i, result
        finally:
            for future in futures:
                future.cancel()

    def close(self) -> None:
        if self.owned:
            self.executor.shutdown(wait=True, cancel_futures=True)


class DaskRunner:
    """A `dask.distributed.Client`: tasks are retried on another worker when one dies."""

    def __init__(self, client: Any, *, owned: bool, retries: int) -> None:
        self.client, self.owned, self.retries = client, owned, retries

    def run(self, fn: Callable[[T], R], tasks: Sequence[T]) -> Iterator[tuple[int, R]]:
        from distributed import as_completed as dask_completed

        # Earlier tasks first (the caller puts big shards first): Dask runs higher priority
        # first. pure=False: a rerun must run again, not reuse a cached result.
        futures = [
            self.client.submit(fn, t, retries=self.retries, pure=False, priority=len(tasks) - i)
            for i, t in enumerate(tasks)
        ]
        where = {f.key: i for i, f in enumerate(futures)}
        try:
            for future in dask_completed(futures):  # type: ignore[no-untyped-call]
                yield where[future.key], future.result()
        finally:
            self.client.cancel([f for f in futures if not f.done()])

    def close(self) -> None:
        if self.owned:
            self.client.close()


def is_in_process(executor: object) -> bool:
    """True for the default: shards produced by this process's own pipeline (threads)."""
    return executor is None or executor == "threads"


def runner_for(executor: object, *, retries: int | None = None) -> TaskRunner:
    """The runner for `executor` (anything but the in-process default, see `is_in_process`).

    Args:
        executor: ``"processes"`` or ``"processes:N"`` (a process pool on this machine),
            ``"dask://HOST:PORT"`` or ``"dask"`` (the scheduler in ``DASK_SCHEDULER_ADDRESS``),
            a `concurrent.futures.Executor`, or a `dask.distributed.Client`.
        retries: per-task retries (default `DEFAULT_RETRIES`), on every engine.

    Raises:
        ConversionError: an executor this does not know, or Dask asked for but not installed.
    """
    tries = DEFAULT_RETRIES if retries is None else retries
    if isinstance(executor, Executor):
        return FuturesRunner(executor, owned=False, retries=tries)
    distributed = sys.modules.get("distributed")  # a Client exists only if this is imported
    if distributed is not None and isinstance(executor, distributed.Client):
        return DaskRunner(executor, owned=False, retries=tries)
    if isinstance(executor, str):
        kind, _, arg = executor.partition(":")
        if kind == "processes":
            pool = _process_pool(arg)
            return FuturesRunner(pool, owned=True, retries=tries, remake=lambda: _process_pool(arg))
        if executor == "dask" or executor.startswith("dask://"):
            address = executor[len("dask://") :] if executor != "dask" else ""
            if not address:
                address = os.environ.get("DASK_SCHEDULER_ADDRESS", "")
                if not address:
                    raise ConversionError(
                        "--executor dask: set DASK_SCHEDULER_ADDRESS to the scheduler's address "
                        "(tcp://HOST:8786), or write --executor dask://HOST:PORT"
                    )
            return DaskRunner(_dask_client(address), owned=True, retries=tries)
    raise ConversionError(f"unknown executor {executor!r}; use {_FORMS}")


def _process_pool(arg: str) -> ProcessPoolExecutor:
    if arg and not (arg.isdigit() and int(arg) > 0):
        raise ConversionError(f"--executor processes:{arg}: N must be a positive whole number")
    workers = int(arg) if arg else (os.cpu_count() or 1)
    # spawn, not fork: the converter has threads (read-ahead, commits) that a fork would copy
    # in whatever state they are in.
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def _dask_client(address: str) -> Any:
    try:
        from distributed import Client
    except ImportError as e:
        raise ConversionError(
            "the dask executor needs Dask: pip install 'weightbridge[dask]' "
            "(or pip install 'dask[distributed]')"
        ) from e
    if "://" not in address:
        address = f"tcp://{address}"
    try:
        return Client(address, timeout=30)  # type: ignore[no-untyped-call]
    except OSError as e:
        raise ConversionError(f"cannot reach the Dask scheduler at {address} ({e})") from e
