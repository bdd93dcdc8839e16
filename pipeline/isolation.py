"""Run a function over many inputs in worker processes, so that one bad input costs one result, not the run.

Decoders are C libraries: a corrupt file can segfault or hang them. Each worker owns one task at a time,
so when a worker dies (a signal) or runs past the per-task timeout, the main process knows which task it
was, records it as failed, and starts a fresh worker. ``concurrent.futures`` cannot do this: a dead worker
breaks the whole pool and the culprit is unknown.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any


@dataclass
class Outcome:
    key: Any
    ok: bool
    value: Any = None        # the function's result when ok
    error: str = ""          # error class name, "timeout" or the signal name (SIGSEGV, ...)
    message: str = ""
    seconds: float = 0.0


def _worker_loop(conn, fn, init, init_args):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    if init is not None:
        init(*init_args)
    conn.send("ready")  # the per-task clock starts after start-up (imports can take seconds)
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        key, arg = msg
        t0 = time.perf_counter()
        try:
            result = (True, fn(arg), "", "")
        except Exception as e:  # noqa: BLE001 - every failure of one input is reported, none stops the worker
            last = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
            where = f" ({last.filename.rsplit('/', 1)[-1]}:{last.lineno})" if last else ""
            result = (False, None, type(e).__name__, f"{e}{where}")
        conn.send((key, *result, time.perf_counter() - t0))


class _Worker:
    def __init__(self, ctx, fn, init, init_args):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_loop, args=(child, fn, init, init_args), daemon=True)
        self.proc.start()
        child.close()
        self.ready = False
        self.task: tuple[Any, float] | None = None  # (key, start time)

    def stop(self, kill: bool = False) -> None:
        if kill:
            self.proc.kill()
        else:
            try:
                self.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


def _signal_name(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            return signal.Signals(-exitcode).name
        except ValueError:
            return f"signal {-exitcode}"
    return f"exit code {exitcode}"


def isolated_map(fn: Callable[[Any], Any], tasks: Iterable[tuple[Any, Any]], workers: int = 1,
                 timeout: float | None = None, init: Callable | None = None, init_args: tuple = ()
                 ) -> Iterator[Outcome]:
    """Yield an ``Outcome`` per ``(key, arg)`` task, in completion order, computing ``fn(arg)`` in ``workers``
    spawned processes (``workers=0`` runs inline, without isolation). ``fn`` and ``init`` must be importable
    module-level functions. At most ``workers`` tasks are in flight, so results never pile up in memory."""
    tasks = iter(tasks)
    if workers <= 0:
        if init is not None:
            init(*init_args)
        for key, arg in tasks:
            t0 = time.perf_counter()
            try:
                yield Outcome(key, True, fn(arg), seconds=time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001
                yield Outcome(key, False, None, type(e).__name__, str(e), time.perf_counter() - t0)
        return

    ctx = mp.get_context("spawn")  # fork after torch has started threads is unsafe
    pool = [_Worker(ctx, fn, init, init_args) for _ in range(workers)]
    pending = True
    try:
        while True:
            for w in pool:
                if w.ready and w.task is None and pending:
                    try:
                        key, arg = next(tasks)
                    except StopIteration:
                        pending = False
                        break
                    w.conn.send((key, arg))
                    w.task = (key, time.perf_counter())
            starting = [w for w in pool if not w.ready]
            busy = [w for w in pool if w.task is not None]
            if not busy and not (pending and starting):
                return
            watch = busy + starting
            ready = wait([w.conn for w in watch] + [w.proc.sentinel for w in watch], timeout=1.0)
            for i, w in enumerate(pool):
                if not w.ready and w.conn in ready:
                    try:
                        w.ready = w.conn.recv() == "ready"
                    except (EOFError, OSError):
                        code = w.proc.exitcode
                        w.stop(kill=True)
                        raise RuntimeError(f"worker process failed to start ({_signal_name(code)})") from None
            now = time.perf_counter()
            for i, w in enumerate(pool):
                if w.task is None:
                    continue
                key, t0 = w.task
                if w.conn in ready:
                    try:
                        rkey, ok, value, err, msg, secs = w.conn.recv()
                    except (EOFError, OSError):
                        pass  # died while sending: handled as a death below
                    else:
                        w.task = None
                        yield Outcome(rkey, ok, value, err, msg, secs)
                        continue
                dead = not w.proc.is_alive()
                late = timeout is not None and now - t0 > timeout
                if dead or late:
                    code = w.proc.exitcode
                    w.stop(kill=True)
                    pool[i] = _Worker(ctx, fn, init, init_args)
                    if late and not dead:
                        yield Outcome(key, False, None, "timeout", f"no result after {timeout:g} s", now - t0)
                    else:
                        yield Outcome(key, False, None, _signal_name(code), "decoder process died", now - t0)
    finally:
        for w in pool:
            w.stop(kill=w.task is not None)
