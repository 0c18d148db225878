"""The RabbitMQ side of smtpstate.queue, through kombu: queue names and
declarations, connections, and the worker's transport.

This module owns how jobs, results and dead letters sit on RabbitMQ:
durable quorum queues on the default exchange, the job queue's delivery
limit, the delay queues that expire back into it, publisher confirms
(smtpstate._confirms), and :class:`AmqpTransport`, the worker's view of
all that (the same interface as smtpstate._redis_queue.RedisTransport).
The job and result formats are smtpstate.queue's.
"""

from __future__ import annotations

import logging
import socket
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Type

log = logging.getLogger("smtpstate.queue")

JOB_CONTENT_TYPE = "application/vnd.smtpstate.job+json"
RESULT_CONTENT_TYPE = "application/vnd.smtpstate.result+json"
DEAD_CONTENT_TYPE = "application/vnd.smtpstate.dead+json"
#: Several jobs, or their results, in one broker message (enqueue(batch=)).
BATCH_CONTENT_TYPE = "application/vnd.smtpstate.batch+json"
RESULTS_CONTENT_TYPE = "application/vnd.smtpstate.results+json"


class Published(NamedTuple):
    """One thing a worker publishes for a broker message it settles."""

    #: "results" (Q.results), "delay" (a retry, after ``delay`` s),
    #: "jobs" (back on the job queue) or "dead" (Q.dead, with ``reason``).
    kind: str
    body: bytes
    delay: Optional[float] = None
    reason: str = ""
    #: The body holds a batch (of jobs or of results).
    batch: bool = False
    #: The body is msgpack, not JSON (smtpstate._encoding).
    binary: bool = False


def content_type(kind: str, batch: bool = False, binary: bool = False) -> str:
    """The AMQP content type of what a Published of ``kind`` holds (for
    people and tools looking at the queues: readers tell the encodings
    apart by the body's first byte, as on Redis, which has no headers)."""
    if kind == "dead":
        return DEAD_CONTENT_TYPE
    name = ("results" if batch else "result") if kind == "results" else \
        ("batch" if batch else "job")
    return f"application/vnd.smtpstate.{name}+{'msgpack' if binary else 'json'}"


def _kombu() -> Any:
    try:
        import kombu
    except ImportError:
        raise ImportError("smtpstate.queue needs kombu: pip install 'smtpstate[queue]'") from None
    return kombu


def _is_amqp(conn: Any) -> bool:
    return getattr(conn.transport, "driver_type", "") == "amqp"


#: Deliveries of one job without an acknowledgement (its worker died each
#: time, or gave it back) after which RabbitMQ dead-letters it to
#: ``Q.dead`` as it is: a job that kills every worker taking it must not
#: go round for ever.
DELIVERY_LIMIT = 20


def _queue(conn: Any, name: str, *, delay: Optional[float] = None,
           back_to: Optional[str] = None, dead_to: Optional[str] = None) -> Any:
    """A kombu Queue on the default exchange (routing key = its name):
    durable; on RabbitMQ a quorum queue; for a delay queue one whose
    messages expire after ``delay`` seconds into ``back_to``; for a job
    queue one that dead-letters into ``dead_to`` after DELIVERY_LIMIT."""
    kombu = _kombu()
    args: Dict[str, Any] = {}
    if _is_amqp(conn):
        args = {"x-queue-type": "quorum"}
        # Dead-lettering out of a quorum queue is done at least once only
        # with the "at-least-once" strategy (RabbitMQ 3.10+), which needs
        # reject-publish overflow; otherwise a crash could lose the job.
        if delay is not None:
            args.update({"x-message-ttl": int(delay * 1000), "x-dead-letter-exchange": "",
                         "x-dead-letter-routing-key": back_to,
                         "x-dead-letter-strategy": "at-least-once",
                         "x-overflow": "reject-publish"})
        elif dead_to is not None:
            args.update({"x-delivery-limit": DELIVERY_LIMIT, "x-dead-letter-exchange": "",
                         "x-dead-letter-routing-key": dead_to,
                         "x-dead-letter-strategy": "at-least-once",
                         "x-overflow": "reject-publish"})
    return kombu.Queue(name, exchange=kombu.Exchange(""), routing_key=name, durable=True,
                       auto_delete=False, queue_arguments=args or None)


def _job_queue(conn: Any, name: str) -> Any:
    """The job queue ``name`` as every producer and consumer declares it
    (RabbitMQ refuses a second declaration with other arguments)."""
    return _queue(conn, name, dead_to=name + ".dead")


def _connect(broker_url: str, *, confirm_publish: bool = True) -> Any:
    kombu = _kombu()
    # confirm_publish: py-amqp waits for the broker's ack of every publish
    # (publisher confirms); publish() raises if the broker nacks. enqueue()
    # and the worker turn it off and confirm on a channel of their own
    # instead (_confirms.ConfirmedPublisher): many publishes, one wait.
    return kombu.Connection(broker_url,
                            transport_options={"confirm_publish": confirm_publish})


class AmqpTransport:
    """The worker's broker on RabbitMQ (AMQP, through kombu): jobs from a
    quorum queue with a prefetch window, results and dead letters
    published with confirms, retries through the delay queues.

    :meth:`settle` publishes at once but acknowledges later:
    :meth:`housekeeping` (once per turn of the worker's loop) waits for
    the broker's confirms of everything published in the turn, then
    acknowledges those messages. One wait per turn instead of one round trip
    per job, and still no job acknowledged before what follows from it is
    confirmed. What a lost connection leaves unconfirmed,
    :meth:`unconfirmed` hands back to be published again."""

    #: A lost connection loses the deliveries (their tags die with it).
    survives_reconnect = False

    def __init__(self, broker_url: str, queue: str, schedule: Sequence[float],
                 prefetch: int) -> None:
        self.conn = _connect(broker_url, confirm_publish=False)
        try:
            self._setup(queue, schedule, prefetch)
        except BaseException:
            quietly(self.conn.release)
            raise

    def _setup(self, q: str, schedule: Sequence[float], prefetch: int) -> None:
        from smtpstate._confirms import ConfirmedPublisher

        self._q = _job_queue(self.conn, q)
        self._results_q = _queue(self.conn, q + ".results")
        self._dead_q = _queue(self.conn, q + ".dead")
        self._delay_qs = {s: _queue(self.conn, f"{q}.delay.{_seconds_name(s)}", delay=s,
                                    back_to=q)
                          for s in sorted(set(schedule))}
        for kq in [self._q, self._results_q, self._dead_q, *self._delay_qs.values()]:
            kq(self.conn.default_channel).declare()
        self.publisher = ConfirmedPublisher(self.conn, True)
        # Broker messages whose results, retries or dead letters are
        # published and not yet confirmed: (the message or None, what to
        # call before its ack, what to publish again if the connection
        # dies first).
        self._unacked: List[Tuple[Any, Optional[Callable[[bool], None]],
                                  Callable[[], Sequence[Published]], Any]] = []
        self._got: List[Any] = []
        self.consumer = self.conn.Consumer([self._q], on_message=self._got.append,
                                           prefetch_count=prefetch, accept=[])
        self.consumer.consume()
        # What a lost broker raises: the transport's own errors, and
        # kombu's OperationalError, which it raises for them on reconnect.
        # A refused publish (basic.nack) too: what the turn published is
        # published again after reconnecting, marked, as after a loss.
        from smtpstate._confirms import BrokerRefusedError
        self.errors: Tuple[Type[BaseException], ...] = (
            tuple(self.conn.connection_errors) + tuple(self.conn.channel_errors)
            + (_kombu().exceptions.OperationalError, OSError, BrokerRefusedError))

    def poll(self, timeout: float, room: int) -> List[Tuple[bytes, bool, Any]]:
        """Jobs the broker delivered (within the prefetch window, so
        ``room`` is the broker's to keep), waiting up to ``timeout`` s."""
        del room
        if not self._got:
            try:
                self.conn.drain_events(timeout=timeout)
            except socket.timeout:
                pass
        got, self._got[:] = list(self._got), []
        return [(body_bytes(m.body), bool(m.delivery_info.get("redelivered")), m)
                for m in got]

    def fileno(self) -> Optional[int]:
        """The broker connection's socket, for the worker's wait (what
        py-amqp has read but not made into frames yet: :meth:`pending`)."""
        return int(self.conn.connection.sock.fileno())

    def pending(self) -> bool:
        """Deliveries already read (while waiting for confirms), or bytes
        read from the socket and not yet made into frames (TLS decrypts
        whole records: the rest of one waits in the SSL object, the socket
        not readable): poll() although the socket has nothing new."""
        if self._got:
            return True
        transport = getattr(self.conn.connection, "transport", None)
        sock = getattr(transport, "sock", None)
        pending = getattr(sock, "pending", None)
        return bool(getattr(transport, "_read_buffer", b"")) or (
            pending is not None and pending() > 0)

    def resume(self, known: List[Any]) -> None:
        del known                           # a new channel: nothing of the old one

    def housekeeping(self) -> None:
        """Wait for the confirms of what this turn published, then
        acknowledge the jobs it settled (deliveries that arrive meanwhile
        are kept for the next poll())."""
        if not self._unacked:
            return
        self.publisher.wait()
        done, self._unacked = self._unacked, []
        for msg, before_ack, _if_lost, _identity in done:
            if before_ack is not None:
                before_ack(False)
            if msg is not None:
                msg.ack()

    def stop_taking(self) -> None:
        self.consumer.cancel()

    def send(self, what: Published) -> None:
        """Publish a result, retry, job or dead letter; acknowledge nothing."""
        kind = content_type(what.kind, what.batch, what.binary)
        if what.kind == "results":
            self.publisher.publish(what.body, self._results_q.name, kind)
        elif what.kind in ("delay", "jobs"):
            target = self._q if what.delay is None else self._delay_qs[what.delay]
            self.publisher.publish(what.body, target.name, kind)
        else:
            self.publisher.publish(what.body, self._dead_q.name, DEAD_CONTENT_TYPE,
                                   {"x-smtpstate-reason": what.reason[:200]})

    def settle(self, msg: Any, publish: Sequence[Published],
               if_lost: Callable[[], Sequence[Published]],
               before_ack: Optional[Callable[[bool], None]] = None,
               identity: Any = None) -> None:
        """Publish what follows from broker message ``msg`` (None: one
        whose delivery died with an earlier connection, nothing to
        acknowledge here) now, and acknowledge it in :meth:`housekeeping`
        once the broker confirmed it all, after ``before_ack``.
        ``if_lost()``: the same marked redelivered, to publish instead
        should the connection die before the confirms (:meth:`unconfirmed`;
        made only then); ``before_ack(marked)`` is told which of the two
        the broker has in the end. ``identity``: the caller's name for the
        message, handed back by :meth:`unconfirmed`."""
        for what in publish:
            self.send(what)
        self._unacked.append((msg, before_ack, if_lost, identity))

    def unconfirmed(self) -> List[Tuple[Any, Optional[Callable[[bool], None]],
                                        Callable[[], Sequence[Published]]]]:
        """What was published and not known to be confirmed when the
        connection died, as (the identity of the message it was for, what
        to call before its ack, the marked variants to publish again)."""
        pending, self._unacked = self._unacked, []
        return [(identity, before_ack, if_lost)
                for _msg, before_ack, if_lost, identity in pending]

    def ack(self, msg: Any) -> None:
        if msg is not None:
            msg.ack()

    def give_back(self, msg: Any) -> None:
        msg.requeue()

    def close(self) -> None:
        # What is still unacknowledged is requeued by the broker when the
        # connection closes.
        self.conn.release()


def _seconds_name(seconds: float) -> str:
    """A delay queue's name for a step: its milliseconds in seconds,
    exactly (300 -> "300", 1.5 -> "1.5"), as its TTL is."""
    return f"{round(seconds * 1000) / 1000:.3f}".rstrip("0").rstrip(".")


def body_bytes(body: Any) -> bytes:
    return body.encode() if isinstance(body, str) else bytes(body)


def quietly(close: Callable[[], None]) -> None:
    try:
        close()
    except Exception as e:                 # closing what already failed
        log.debug("closing the broker connection: %s", e)
