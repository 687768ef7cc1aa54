"""Task runners (`weightbridge.streaming.executors`): retries, and a process pool remade when
one of its workers dies. Real process pools; a task knows it ran before by a file it leaves."""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from weightbridge.errors import FormatError
from weightbridge.streaming.executors import runner_for


def _die_once(arg: tuple[str, int]) -> int:
    """Kills its own worker process the first time it runs for task 1 (as an OOM kill would)."""
    marker, i = arg
    if i == 1 and not os.path.exists(marker):
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return i * 10


def _fail_once(arg: tuple[str, int]) -> int:
    marker, i = arg
    if i == 2 and not os.path.exists(marker):
        Path(marker).touch()
        raise OSError("transient: connection reset")
    return i * 10


def _bad_input(arg: tuple[str, int]) -> int:
    marker, i = arg
    with open(marker, "a") as f:
        f.write("x")
    raise FormatError(f"{marker}: corrupt (task {i})")


def test_a_killed_worker_is_replaced_and_its_tasks_run_again(tmp_path: Path) -> None:
    marker = str(tmp_path / "died")
    runner = runner_for("processes:2", retries=1)
    try:
        got = dict(runner.run(_die_once, [(marker, i) for i in range(4)]))
    finally:
        runner.close()
    assert got == {0: 0, 1: 10, 2: 20, 3: 30}
    assert os.path.exists(marker)  # it did die once


def test_without_retries_a_killed_worker_fails_the_run(tmp_path: Path) -> None:
    from concurrent.futures.process import BrokenProcessPool

    runner = runner_for("processes:2", retries=0)
    try:
        with pytest.raises(BrokenProcessPool):
            dict(runner.run(_die_once, [(str(tmp_path / "died"), i) for i in range(4)]))
    finally:
        runner.close()


def test_a_failed_task_is_retried_on_a_given_executor(tmp_path: Path) -> None:
    with ThreadPoolExecutor(2) as pool:
        runner = runner_for(pool, retries=1)
        got = dict(runner.run(_fail_once, [(str(tmp_path / "failed"), i) for i in range(3)]))
    assert got == {0: 0, 1: 10, 2: 20}


def test_bad_input_is_not_retried(tmp_path: Path) -> None:
    marker = tmp_path / "runs"
    with ThreadPoolExecutor(1) as pool:
        runner = runner_for(pool, retries=3)
        with pytest.raises(FormatError, match="corrupt"):
            dict(runner.run(_bad_input, [(str(marker), 0)]))
    assert marker.read_text() == "x"  # ran once
