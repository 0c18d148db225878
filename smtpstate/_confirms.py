"""Publishing to the broker with one wait for many publisher confirms.

kombu's ``confirm_publish`` transport option makes py-amqp wait for the
broker's confirm after every single publish: one round trip (and on a
quorum queue, one replicated disk write) per message, which caps a
worker at roughly a thousand messages a second whatever its CPU. RabbitMQ
confirms asynchronously (https://www.rabbitmq.com/docs/confirms): after
``confirm.select`` on a channel, every publish on it gets the next
sequence number, from 1, and the broker later sends ``basic.ack`` (or
``basic.nack``) with that number as ``delivery_tag`` — with ``multiple``
set, for every number up to it as well — in no promised order.

:class:`ConfirmedPublisher` uses that: publish a batch, then
:meth:`~ConfirmedPublisher.wait` once until the broker confirmed all of
it. Rule: nothing may be acknowledged on the strength of a publish until
``wait()`` has returned; ``wait()`` raises when the broker refused any.

On Redis (kombu's virtual transport) there are no confirms: a publish is
an ``LPUSH`` that returns once Redis has the message, and ``wait()``
returns at once.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any, Dict, Optional, Set

log = logging.getLogger("smtpstate.queue")


class BrokerRefusedError(RuntimeError):
    """The broker refused (``basic.nack``) published messages: it could not
    take them (a queue at its length limit with ``reject-publish``, an
    internal error). Nothing that depended on them was acknowledged."""


class ConfirmedPublisher:
    """Publish on a channel of its own in confirm mode; wait for the
    confirms of everything published so far in one go.

    Args:
        conn: a kombu Connection made *without* the ``confirm_publish``
            transport option (that option makes every publish wait alone).
        amqp: whether the transport is AMQP (RabbitMQ): confirms are used
            there only.

    Not thread-safe, like the kombu channel under it: one thread.
    """

    def __init__(self, conn: Any, amqp: bool) -> None:
        self._conn = conn
        self._amqp = amqp
        self.channel = conn.channel()
        self._producer = conn.Producer(channel=self.channel)
        # Sequence numbers published and not yet confirmed, and how many
        # were refused since the last wait().
        self._next = 1
        self._pending: Set[int] = set()
        self._refused = 0
        if amqp:
            self.channel.events["basic_ack"].add(self._on_ack)
            self.channel.events["basic_nack"].add(self._on_nack)
            self.channel.confirm_select()

    @property
    def pending(self) -> int:
        """Messages published and not yet confirmed."""
        return len(self._pending)

    def publish(self, body: bytes, routing_key: str, content_type: str,
                headers: Optional[Dict[str, Any]] = None) -> None:
        """Publish one persistent message on the default exchange to the
        queue ``routing_key`` (declared beforehand); do not wait."""
        self._producer.publish(body, exchange="", routing_key=routing_key,
                               content_type=content_type, content_encoding="binary",
                               delivery_mode=2, headers=headers or {}, retry=False)
        if self._amqp:
            self._pending.add(self._next)
            self._next += 1

    def wait(self, timeout: Optional[float] = None) -> None:
        """Return once the broker confirmed every message published so far.

        Broker events for other channels of the connection (deliveries to
        a consumer) are dispatched meanwhile, as ``drain_events`` does.

        Raises:
            BrokerRefusedError: the broker refused some of them (the count
                is in the message); the caller must not acknowledge what
                depended on them.
            TimeoutError: no confirm of all of them within ``timeout``
                seconds (None: wait as long as it takes, as a broker that
                blocks publishers under memory pressure may).
            kombu/amqp connection and channel errors, as they come.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._pending:
            slice_ = 1.0
            if deadline is not None:
                slice_ = deadline - time.monotonic()
                if slice_ <= 0:
                    raise TimeoutError(f"the broker did not confirm {len(self._pending)} "
                                       f"published message(s) within {timeout:g} s: is it "
                                       "blocking publishers (memory or disk alarm)?")
                slice_ = min(slice_, 1.0)
            try:
                self._conn.drain_events(timeout=slice_)
            except socket.timeout:
                pass
        if self._refused:
            refused, self._refused = self._refused, 0
            raise BrokerRefusedError(f"the broker refused {refused} published message(s) "
                                     "(basic.nack): see its log (a queue at its length "
                                     "limit, a node without quorum)")

    def _settle(self, tag: int, multiple: bool) -> int:
        if multiple:
            done = {s for s in self._pending if s <= tag}
            self._pending -= done
            return len(done)
        if tag in self._pending:
            self._pending.discard(tag)
            return 1
        return 0

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        self._settle(delivery_tag, multiple)

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        count = self._settle(delivery_tag, multiple)
        self._refused += count
        log.error("the broker refused %d published message(s) (basic.nack, tag %d)",
                  count, delivery_tag)
