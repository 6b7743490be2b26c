"""An ordered map over spawned worker processes, made to survive long `tinyk data` runs: workers
leave the stop signals (Ctrl-C, SIGTERM, SIGHUP) to the parent, die with a parent killed outright,
never run the caller's script, and a pool stopped mid-task (a full disk, a killed worker) cannot hang.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.context
import multiprocessing.pool
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from itertools import chain
from multiprocessing import resource_tracker
from typing import Any, TypeVar

from .errors import STOP_SIGNALS, TinykError, signal_handlers

A = TypeVar("A")
R = TypeVar("R")

_TASK: tuple[Callable[[Any, Any], Any], Any, int] | None = None  # a worker's function, its fixed argument, parent
PARENT_CHECK_S = 0.2  # how often a worker looks for its parent


def _init_worker(fn: Callable[[Any, Any], Any], arg: Any, parent: int) -> None:
    global _TASK
    die_with(parent)
    # Stop signals reach every process of the group (a closed terminal, `kill -TERM -PGID`, systemd,
    # Slurm): the parent stops the pool; a worker killed by one while it held the pool's task pipe
    # would have left the parent waiting for that pipe forever.
    for s in STOP_SIGNALS:  # inherited already; kept should the start method change
        signal.signal(s, signal.SIG_IGN)
    # Each worker is one core; tokenizers' own thread pool would oversubscribe them.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _TASK = fn, arg, parent


def die_with(parent: int) -> None:
    """A worker whose parent is killed (kill -9, the OOM killer) ends with it, within a fraction of a
    second, rather than tokenizing for no one and printing a BrokenPipeError traceback when it hands
    its batch over. POSIX only: there a dead parent's children are adopted by another process.

    Linux's parent-death signal would be instant, but it follows the thread that started the worker,
    and the pool starts a dead worker's replacement from its own thread, which ends as the pool stops:
    the replacement was killed then, maybe mid-hand-over, holding the results' pipe for good."""
    if os.name != "posix":
        return
    if _orphaned(parent):  # killed before this worker got here
        os._exit(1)
    threading.Thread(target=_end_with, args=(parent,), name="tinyk-parent-watch", daemon=True).start()


def _orphaned(parent: int) -> bool:
    """Whether the process that started this one has died (POSIX: another one adopted it)."""
    return os.name == "posix" and os.getppid() != parent


def _end_with(parent: int) -> None:
    while not _orphaned(parent):
        time.sleep(PARENT_CHECK_S)
    os._exit(1)


def _work(payload: Any) -> Any:
    assert _TASK is not None
    fn, arg, parent = _TASK
    result = fn(arg, payload)
    if _orphaned(parent):  # died meanwhile: no one to hand it to (a BrokenPipeError)
        os._exit(1)
    return result


def map_ordered(fn: Callable[[A, Any], R], arg: A, payloads: Iterable[tuple[Any, Any]], workers: int
                ) -> Iterator[tuple[Any, R]]:
    """`fn(arg, payload)` of (tag, payload) pairs in order, in `workers` processes once there is more
    than one payload; yields (tag, result). `fn` is a module's function and `arg` picklable: each worker
    gets them once.

    At most two payloads per worker are in flight, which bounds memory whatever the input size.
    """
    it = iter(payloads)
    head = [p for p in (next(it, None), next(it, None)) if p is not None]
    if workers <= 1 or len(head) < 2:
        for tag, p in chain(head, it):
            yield tag, fn(arg, p)
        return
    with start_pool(workers, fn, arg) as pool:
        pending: deque = deque()
        # Every worker the pool has had: the pool replaces a dead one within a tenth of a second, and
        # only the first ones can die before the results start coming in.
        started = set(pool._pool)
        for tag, p in chain(head, it):
            pending.append((tag, pool.apply_async(_work, (p,))))
            if len(pending) >= 2 * workers:
                tag, result = pending.popleft()
                yield tag, _result(pool, result, started)
        while pending:
            tag, result = pending.popleft()
            yield tag, _result(pool, result, started)


def _result(pool: Any, result: Any, started: set) -> Any:
    """`result.get()`, or a TinykError once a worker has died (the OOM killer, kill -9): the pool starts
    another in its place, and the task the dead one held never comes back, so the wait would never end."""
    started.update(list(pool._pool))  # replacements: they die too
    while not result.ready():
        if dead := next((w for w in started if w.exitcode not in (None, 0)), None):
            code = dead.exitcode
            how = f"killed by {_signal_name(-code)}" if code < 0 else f"exit status {code}"
            oom = " (the system's out-of-memory killer, most likely: fewer --workers use less)" \
                if code == -signal.SIGKILL else ""
            raise TinykError(f"a worker process died while tokenizing ({how}){oom}") \
                from ChildProcessError(f"worker {dead.pid}: {how}")  # not the input's fault: the work done is kept
        result.wait(1.0)
    return result.get()


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # a real-time signal, which has no name
        return f"signal {number}"


@contextlib.contextmanager
def start_pool(workers: int, fn: Callable[[A, Any], Any], arg: A) -> Iterator[Any]:
    """A pool of spawned workers (not forked: the caller may hold threads, torch's or tokenizers',
    that fork would break) that leave Ctrl-C, SIGTERM and SIGHUP to the parent, which stops the pool
    and keeps the work done for the same command to continue (`tinyk data`'s checkpoints).

    Workers start with those ignored, which survives exec, so one that comes while they import does
    not reach them; the parent blocks them meanwhile, so they stay pending (Linux never discards a
    blocked signal) and land once the pool is in hand. Only the main thread can change handlers, and
    only its own mask: where the process has other threads (torch's, tokenizers'), the system may hand
    such a signal to one of them instead, which discards it, and a second Ctrl-C is needed.
    """
    ctx = multiprocessing.get_context("spawn")
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        # Windows has no signal masks (nor the resource tracker's POSIX start): its workers ignore
        # Ctrl-C from the start (`_init_worker`), which is all that can be done there.
        with _spawn_pool(ctx, workers, fn, arg) as pool:
            yield pool
        return
    # Starting it unblocks SIGINT, so not in the window below. It ignores SIGINT and SIGTERM itself;
    # SIGHUP killed it, and it came back with a traceback for each lock of the pool: it starts with
    # SIGHUP blocked, and one that came meanwhile lands here after.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    try:
        resource_tracker.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, set(STOP_SIGNALS))
    try:
        with signal_handlers(dict.fromkeys(STOP_SIGNALS, signal.SIG_IGN)):
            pool = _spawn_pool(ctx, workers, fn, arg)
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        raise
    with pool:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        yield pool


_MAIN_SWAP = threading.Lock()


class _Worker(multiprocessing.context.SpawnProcess):
    """A pool worker, which ignores the stop signals (the pool ends it with SIGKILL) and does not run
    the parent's `__main__` first, as spawned processes do unless it looks interactive: it needs only
    tinyk, and a script that called tinyk without the `if __name__ == "__main__":` guard would have
    every worker run the script (its side effects included) and start workers of its own, which fail.

    Spawning reads `__main__.__spec__` and `__file__` to find the script; only those two are hidden,
    only while a worker starts (synchronously), and under a lock, so two pools never interleave and
    another thread still finds everything the script defines (pickle needs that). A dead worker's
    replacement starts from the pool's own thread: the script, running on, misses those two meanwhile.
    """

    def start(self) -> None:
        main = sys.modules["__main__"]
        with _MAIN_SWAP:
            saved = {k: main.__dict__[k] for k in ("__spec__", "__file__") if k in main.__dict__}
            main.__spec__ = None
            main.__dict__.pop("__file__", None)
            try:
                super().start()
            finally:
                main.__dict__.pop("__spec__", None)
                main.__dict__.update(saved)

    def terminate(self) -> None:
        self.kill()

    def run(self) -> None:
        try:
            super().run()
        except (OSError, EOFError):  # handing a batch over to a parent killed meanwhile (a broken pipe)
            if _TASK is not None and _orphaned(_TASK[2]):
                os._exit(1)  # quietly, as the watch does: a traceback would land after the shell's prompt
            raise


class _Pool(multiprocessing.pool.Pool):
    """A pool whose `terminate()` cannot hang on an error (a full disk) while tasks are in flight, nor
    on a worker killed from outside (the OOM killer) at any point.

    Terminating, the standard pool reads the workers' pipe only while it holds data, then kills the
    workers and joins the thread that writes tasks into that pipe. That thread may start writing one
    more task just after (a batch is megabytes, the pipe holds 64 KiB) and then waits for a reader
    forever. Here the pipe is read until that thread has ended.
    """

    lock_wait_s = 5.0  # for a worker still reading a task to finish it
    stop_wait_s = 15.0  # for the standard stop, which any stop that can end takes less than

    def terminate(self) -> None:
        # A worker killed while it hands a result over (the OOM killer) holds the results' pipe's lock
        # for good, and the standard stop waits for that lock: it runs in a thread of its own, left
        # behind with the workers killed once it takes longer than a stop that can end, or on Ctrl-C
        # (the workers ignore it, and the exit would wait for them). Not where no thread can start
        # (the interpreter's exit, which has run the stop already) or from the pool's own threads,
        # which the standard stop knows not to wait for.
        standard = super().terminate
        if sys.is_finalizing() or threading.current_thread() in (
                self._task_handler, self._worker_handler, self._result_handler):
            standard()
            return
        ended = threading.Event()  # not is_alive(): 3.11's join() interrupted by a signal marks the thread ended

        def stop() -> None:
            try:
                standard()
            finally:
                ended.set()

        threading.Thread(target=stop, name="tinyk-pool-stop", daemon=True).start()
        try:
            ended.wait(self.stop_wait_s)
        finally:
            if not ended.is_set():
                for worker in list(self._pool):
                    worker.kill()

    @staticmethod
    def Process(ctx: Any, *args: Any, **kwargs: Any) -> _Worker:
        return _Worker(*args, **kwargs)

    @staticmethod
    def _help_stuff_finish(inqueue: Any, task_handler: threading.Thread, size: int) -> None:
        # it would wait for itself (the standard pool never joins it then)
        if threading.current_thread() is task_handler:
            return
        # Held for good, as the standard pool does: the workers are being stopped. A worker killed
        # from outside while reading a task (the OOM killer) holds it for good, and then no worker
        # can read: the pipe is read without it.
        inqueue._rlock.acquire(timeout=_Pool.lock_wait_s)
        while task_handler.is_alive():
            if inqueue._reader.poll(0.01):  # bytes, not messages, where it can: a killed reader leaves half of one
                if os.name == "posix":
                    os.read(inqueue._reader.fileno(), 1 << 20)
                else:
                    inqueue._reader.recv_bytes()


def _spawn_pool(ctx: Any, workers: int, fn: Callable[[A, Any], Any], arg: A) -> Any:
    return _Pool(workers, initializer=_init_worker, initargs=(fn, arg, os.getpid()), context=ctx)
