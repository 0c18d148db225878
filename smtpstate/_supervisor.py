"""A supervisor of forked worker processes (``smtpstate worker
--processes N``).

This module owns the process side of running several workers: forking
them, passing SIGTERM/SIGINT on, starting again one that dies (with a
growing delay while it keeps dying young), stopping them all when one
refuses its options, and, on Linux, making each die with the supervisor.
What a child runs is the caller's (smtpstate._worker.run_workers).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any, Callable, Dict, Tuple

log = logging.getLogger("smtpstate.queue")

#: A worker process's exit status when its options are wrong: the
#: supervisor does not start it again (it would fail the same way).
EXIT_BAD_OPTIONS = 3
#: Restart delays for a worker process that keeps dying: doubling from
#: the first, reset once a process has lived ``_STEADY`` seconds.
_RESTART_FIRST, _RESTART_MOST, _STEADY = 1.0, 60.0, 30.0
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def die_with_parent() -> None:
    """Linux: SIGTERM this process when its parent dies (so a supervisor
    killed with SIGKILL leaves no orphaned workers; they stop cleanly and
    their jobs are requeued). Elsewhere a no-op."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def supervise(processes: int, child: Callable[[int], None]) -> int:
    """Run ``processes`` forked children, each ``child(supervisor_pid)``
    (which must never return: it ends with ``os._exit``; it is entered
    with SIGTERM and SIGINT blocked, to unblock once its own handlers are
    in place), until SIGTERM or SIGINT, passed on to each. Return 0 when
    all stopped cleanly, 2 when one exited with EXIT_BAD_OPTIONS (the
    others are then stopped), else 1."""
    me = os.getpid()
    stopping = False
    children: Dict[int, Tuple[int, float]] = {}       # pid -> (slot, started)

    def forward(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    backoff = {slot: _RESTART_FIRST for slot in range(processes)}
    due: Dict[int, float] = {slot: 0.0 for slot in range(processes)}   # slots to start
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    while children or (due and not stopping):
        now = time.monotonic()
        for slot, when in list(due.items()):
            if stopping or when > now:
                continue
            del due[slot]
            # Signals wait until the child has its own handlers and the
            # parent knows the child's pid (forward() must see it).
            signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
            pid = os.fork()
            if pid == 0:                      # the child: nothing of the parent's state used
                child(me)
                os._exit(1)                   # child() must not return
            children[pid] = (slot, now)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        pid, code = _reap_one(children)       # only ours: the caller may have others
        if pid == 0:
            time.sleep(0.2)
            continue
        slot, started = children.pop(pid)
        if stopping:
            if code != 0:
                status = max(status, 1)
            continue
        if os.WIFEXITED(code) and os.WEXITSTATUS(code) == EXIT_BAD_OPTIONS:
            log.error("a worker process refused its options: stopping")
            status = 2
            forward(signal.SIGTERM, None)
            continue
        lived = time.monotonic() - started
        if lived >= _STEADY:
            backoff[slot] = _RESTART_FIRST
        wait = backoff[slot]
        backoff[slot] = min(_RESTART_MOST, wait * 2)
        log.warning("worker process %d %s after %.0f s; starting another in %.0f s", pid,
                    _how_it_ended(code), lived, wait)
        due[slot] = time.monotonic() + wait
    return status


def unblock_stop_signals() -> None:
    """In a child, once its handlers are in place: let SIGTERM/SIGINT in."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


def _reap_one(children: Dict[int, Any]) -> Tuple[int, int]:
    """(pid, wait status) of one of ``children`` that ended, or (0, 0)."""
    for pid in list(children):
        try:
            done, code = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:          # reaped elsewhere: count it as gone
            return pid, 0
        if done:
            return done, code
    return 0, 0


def _how_it_ended(code: int) -> str:
    if os.WIFSIGNALED(code):
        return f"was killed by signal {os.WTERMSIG(code)}"
    return f"exited with status {os.WEXITSTATUS(code)}"
