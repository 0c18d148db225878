"""``smtpstate.aio.Engine``: the C engine on an asyncio event loop.

It owns the glue between one :class:`smtpstate.Engine` and one running
event loop: the engine's epoll descriptor registered with
``loop.add_reader``, one ``loop.call_at`` timer for the engine's next
deadline, and the futures that :meth:`Engine.send` awaits. There is no
thread and no polling slice: the loop calls :meth:`smtpstate.Engine.step`
(never blocks) when the descriptor is readable, when the deadline passes,
and once after each burst of submissions.

Rule 1: every call into the engine happens on the loop's thread, through
this object (``send``, cancellation, ``aclose``); the engine is not
shared with another driver.

Rule 2: after every step the timer is re-armed from
:meth:`smtpstate.Engine.next_deadline`, so that idle connections are
closed, timeouts fire and held messages are released on time even when
no ``send()`` is pending.

Rule 3: a cancelled ``send()`` raises :class:`asyncio.CancelledError` in
its task, as asyncio wants; the message is withdrawn as far as SMTP allows
(:meth:`smtpstate.Engine.cancel`), and the Result it still gets (not
attempted; or whatever the server said, when its data was already out) is
logged and handed to ``on_cancelled`` if given.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Dict, Optional

from smtpstate.engine import Engine as _Engine
from smtpstate.engine import Ticket
from smtpstate.errors import LocalProtocolError
from smtpstate.message import Message
from smtpstate.result import Result, unsent_result

__all__ = ["Engine"]

log = logging.getLogger("smtpstate.aio")


class Engine:
    """Deliver many messages concurrently from an asyncio event loop, over
    the C engine's pooled connections::

        async with aio.Engine(max_per_destination=10) as e:
            result = await e.send(message, "mx.example.net")

    Args:
        on_cancelled: called with the :class:`Result` of each message whose
            ``send()`` was cancelled, once it is known (not attempted, or
            what the server said when its data was already out). Exceptions
            it raises are logged.
        **engine_args: those of :class:`smtpstate.Engine` (``max_connections``,
            ``max_per_destination``, ``idle_timeout``, ``resolver``,
            ``machine``, ``mta_sts`` ...).

    One event loop: the first ``send()`` or ``async with`` binds the engine
    to the running loop.
    """

    def __init__(self, *, on_cancelled: Optional[Callable[[Result], None]] = None,
                 **engine_args: Any) -> None:
        self._engine = _Engine(**engine_args)
        self._on_cancelled = on_cancelled
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._fd = -1
        self._waiters: Dict[Ticket, "asyncio.Future[Result]"] = {}
        self._cancelled: Dict[Ticket, str] = {}     # ticket -> Engine.cancel()'s word
        self._timer: Optional[asyncio.TimerHandle] = None
        self._step_pending = False
        self._closing = False
        self._drained: Optional["asyncio.Future[None]"] = None

    # -- the loop's side ---------------------------------------------------

    @property
    def engine(self) -> _Engine:
        """The :class:`smtpstate.Engine` underneath (read its properties
        from the loop's thread; do not drive it)."""
        return self._engine

    @property
    def pending(self) -> int:
        """Messages whose result is not known yet (cancelled ones too)."""
        return len(self._waiters) + len(self._cancelled)

    def _attach(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            if self._engine.closed:
                raise LocalProtocolError("this aio.Engine is closed")
            self._loop = loop
            self._fd = self._engine.fileno()
            loop.add_reader(self._fd, self._step)
            self._arm()
        elif self._loop is not loop:
            raise LocalProtocolError("this aio.Engine belongs to another event loop")
        return loop

    def _detach(self) -> None:
        if self._loop is not None and self._fd >= 0:
            self._loop.remove_reader(self._fd)
            self._fd = -1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _soon(self) -> None:
        """One step at the loop's next turn, however many sends asked."""
        if not self._step_pending and self._loop is not None:
            self._step_pending = True
            self._loop.call_soon(self._step)

    def _on_timer(self) -> None:
        self._timer = None
        self._step()

    def _step(self) -> None:
        """What is ready: one non-blocking step of the engine, its results
        to their futures, then the timer re-armed (Rule 2)."""
        self._step_pending = False
        if self._engine.closed:
            return
        for r in self._engine.step():
            ticket = r.ticket
            fut = self._waiters.pop(ticket, None)
            if fut is not None:
                if not fut.done():
                    fut.set_result(r)
                continue
            if self._cancelled.pop(ticket, None) is not None:
                self._tell_cancelled(r)
        if self._drained is not None and not self._waiters and not self._cancelled \
                and not self._drained.done():
            self._drained.set_result(None)
        self._arm()

    def _arm(self) -> None:
        """The timer, at the engine's next deadline (none: no timer)."""
        if self._loop is None or self._engine.closed:
            return
        delay = self._engine.next_deadline()
        if delay is None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            return
        when = self._loop.time() + delay
        if self._timer is not None:
            # A timer due first, or at about the same time, is kept: firing
            # early costs one step that finds nothing due and re-arms, while
            # a new handle per step (reply deadlines move at every reply)
            # would cost more than the step.
            if self._timer.when() <= when + 0.001:
                return
            self._timer.cancel()
        self._timer = self._loop.call_at(when, self._on_timer)

    def _tell_cancelled(self, r: Result) -> None:
        log.info("a cancelled send() ended: %s (%s)", r.status, r.reason or r.reply)
        if self._on_cancelled is not None:
            try:
                self._on_cancelled(r)
            except Exception:
                log.exception("on_cancelled raised: ignored")

    # -- the caller's side -------------------------------------------------

    async def send(self, message: Message, host: Optional[str] = None, port: int = 25,
                   **options: Any) -> Result:
        """Deliver ``message`` and return its :class:`Result`.

        Args:
            message: a :class:`smtpstate.Message`.
            host: the server; None: each recipient where its domain's MX
                records say (one Result all the same).
            port: the server's port, or every MX host's.
            **options: those of :meth:`smtpstate.Engine.submit` (``tls``,
                ``auth``, ``timeout``, ``source`` ...).

        Raises:
            asyncio.CancelledError: the task was cancelled; the message is
                withdrawn as far as SMTP allows (see the module's Rule 3).
            TypeError, InvalidOptionError, InvalidMessageError: refused
                before anything was sent, as by ``submit()``.
            LocalProtocolError: the engine is closing or closed.
        """
        loop = self._loop
        if loop is None or self._closing or asyncio.get_running_loop() is not loop:
            loop = self._attach()
            if self._closing:
                raise LocalProtocolError("this aio.Engine is closing")
        ticket = self._engine.submit(message, host, port, **options)
        fut: "asyncio.Future[Result]" = loop.create_future()
        self._waiters[ticket] = fut
        if not self._step_pending:              # _soon(), inline: once per burst
            self._step_pending = True
            loop.call_soon(self._step)
        try:
            return await fut
        except asyncio.CancelledError:
            self._withdraw(ticket)
            raise

    def _withdraw(self, ticket: Ticket) -> None:
        """A send() was cancelled: withdraw its message (Rule 3)."""
        self._waiters.pop(ticket, None)
        if ticket.result is not None or self._engine.closed:
            return                                 # known already: nothing to undo
        outcome = self._engine.cancel(ticket)
        log.debug("send() of ticket %d cancelled: %s", ticket.id, outcome)
        self._cancelled[ticket] = outcome
        self._soon()

    async def aclose(self, timeout: Optional[float] = None) -> None:
        """Finish what is in flight, then close the engine (its idle
        connections with QUIT).

        Args:
            timeout: seconds to wait for the messages in flight; None: as
                long as they take. Past it, each is withdrawn
                (:meth:`smtpstate.Engine.cancel`); a send() still waiting
                after that returns a Result with status "unknown" (its data
                may have reached the server) or "tempfail" (never in a
                session).
        """
        if self._engine.closed:
            self._detach()
            return
        self._closing = True
        if self._loop is not None and (self._waiters or self._cancelled):
            self._drained = self._loop.create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._drained), timeout)
            except asyncio.TimeoutError:
                for ticket in list(self._waiters):
                    if ticket.result is None:
                        self._cancelled.setdefault(ticket, self._engine.cancel(ticket))
                self._step()
        self._detach()
        # Whatever is still without a result: the engine goes now.
        for ticket, fut in list(self._waiters.items()):
            if not fut.done():
                status = "tempfail" if self._cancelled.get(ticket) == "cancelled" else "unknown"
                fut.set_result(unsent_result(
                    ticket.message, ticket, status,
                    "the engine was closed before the result was known"))
        self._waiters.clear()
        self._cancelled.clear()
        self._engine.close()

    async def __aenter__(self) -> "Engine":
        self._attach()
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        """Leave the block: finish what is in flight and close; with an
        exception on its way out, withdraw what is in flight and close at
        once."""
        await self.aclose(timeout=None if exc_type is None else 0)

    def __repr__(self) -> str:
        state = "closed" if self._engine.closed else f"pending={self.pending}"
        return f"<aio.Engine {state}>"
