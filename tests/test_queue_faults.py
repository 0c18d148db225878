"""The worker's loop under what once made it spin, die or mislabel a
result: a finished message waiting to be published while the broker is
down (no busy loop, unit and against a restarted Redis), a job of a
msgpack batch the engine refuses (dead-lettered, the worker goes on), a
result published again marked after a lost connection (on_result gets
the mark too), a stop while the broker is down (the engine still
stepped, the broker not hammered)."""

from __future__ import annotations

import os
import time

from smtpstate import _jobs, _worker
from smtpstate import queue as q


class _IdleEngine:
    """An engine with nothing to do: its descriptor never readable, no
    timer due, no results."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        self.steps = 0

    def fileno(self) -> int:
        return self._r

    def next_deadline(self):
        return None

    def step(self):
        self.steps += 1
        return []

    def close(self) -> None:
        os.close(self._r)
        os.close(self._w)


def test_no_spin_while_reconnecting_with_a_message_to_publish():
    """While the broker is down (run()'s reconnect pause calls _turn with no
    transport), a broker message whose jobs are done waits in _complete
    until reconnected. _turn then must still wait (select), not return at
    once: otherwise the worker spins at 100% CPU for the whole outage."""
    worker = q.Worker("redis://127.0.0.1:1/0")
    engine = _IdleEngine()
    try:
        carried = _worker._Carried(None, None, b"{}", False, False, 1, False)
        carried.remaining = 0
        worker._complete.append(carried)
        until = time.monotonic() + 0.5
        cpu = time.process_time()
        while time.monotonic() < until:          # as run()'s reconnect loop
            worker._turn(engine, None, until - time.monotonic())
        cpu = time.process_time() - cpu
        assert engine.steps < 50, (
            f"{engine.steps} turns and {cpu:.2f} s of CPU in a 0.5 s reconnect pause: "
            "the loop spins")
    finally:
        engine.close()


def _msgpack_batch_engine_refuses():
    """A msgpack batch of one job that the full checks accept, but the
    engine refuses at submit (timeout -1), whose settled entry holds a
    msgpack bin value (the checks of settled entries leave other fields
    free)."""
    import uuid

    import msgpack
    job = {"version": 1, "id": str(uuid.uuid4()), "sender": "a@example.com",
           "recipients": [{"address": "b@example.com", "notify": [], "orcpt": None,
                           "index": 1}],
           "data": b"Subject: x\r\n\r\nhi\r\n", "message_options": {},
           "host": "127.0.0.1", "port": 9, "options": {"timeout": -1.0},
           "attempts": 1, "first_enqueued": time.time(),
           "settled": [{"address": "c@example.com", "status": "permfail", "index": 0,
                        "reply": b"\x00"}]}
    return msgpack.packb({"version": 1, "jobs": [job]}, use_bin_type=True)


def test_a_refused_job_of_a_msgpack_batch_is_dead_lettered_not_raised():
    """Worker._submit dead-letters a job the engine refuses; for a batch
    _job_dead writes job.to_json(), which raises TypeError for a job read
    from msgpack holding bytes: the exception leaves _submit, _take and
    run(), and the worker dies (each next worker too)."""
    from smtpstate.engine import Engine
    body = _msgpack_batch_engine_refuses()
    jobs, batch, binary = _jobs._parse(body)          # read fine: a valid batch
    assert batch and binary and len(jobs) == 1
    worker = q.Worker("redis://127.0.0.1:1/0")
    carried = _worker._Carried(None, None, body, True, True, 1, False)
    engine = Engine()
    try:
        try:
            worker._submit(engine, carried, jobs)
        except Exception as e:                                  # noqa: BLE001
            raise AssertionError(f"_submit raised {e!r} instead of dead-lettering") from e
        assert len(carried.dead) == 1
    finally:
        engine.close()


def test_redis_worker_survives_a_refused_job_in_a_msgpack_batch(redis_broker, queue_name):
    """The same through a real worker process on Redis: it must
    dead-letter the job and go on (not exit)."""
    import redis

    from test_queue import _stop, _worker
    r = redis.Redis.from_url(redis_broker.url)
    r.lpush(queue_name, _msgpack_batch_engine_refuses())
    worker = _worker(redis_broker.url, queue_name)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not r.llen(queue_name + ".dead") \
                and worker.poll() is None:
            time.sleep(0.2)
        time.sleep(1.0)
        alive = worker.poll() is None
        dead = r.llen(queue_name + ".dead")
    finally:
        code = _stop(worker)
        worker.err_file.seek(0)
        err = worker.err_file.read().decode(errors="replace")
    assert alive and dead == 1, (f"worker alive={alive} exit={code} dead letters={dead}; "
                                 f"log tail: {err[-600:]}")


class _FakeAmqp:
    """AmqpTransport's interface as Worker uses it around a lost
    connection: settle() keeps what it was given, unconfirmed() hands it
    back, send() records what is published."""

    survives_reconnect = False

    def __init__(self) -> None:
        self.unacked = []
        self.sent = []
        self.publisher = self

    def settle(self, msg, publish, if_lost, before_ack=None, identity=None):
        self.sent.extend(publish)
        self.unacked.append((identity, before_ack, if_lost))

    def unconfirmed(self):
        out, self.unacked = self.unacked, []
        return out

    def send(self, what):
        self.sent.append(what)

    def wait(self):
        pass

    def close(self):
        pass


def test_on_result_gets_the_mark_of_the_result_published_again():
    """A result published, then its connection lost before the confirm:
    the worker publishes it again marked redelivered (the broker requeued
    the job, another worker may deliver it). on_result, called once it is
    confirmed, must get the same dict (docs/queue.md: "the same dict"),
    marked too; it gets the unmarked one."""
    import json as _json
    got = []
    worker = q.Worker("amqp://127.0.0.1:1//", on_result=got.append)
    ident = "0b5e3c1e-6c1c-4b43-9a1e-1e2c3d4e5f60"
    carried = _worker._Carried(object(), ((ident,), (0,)), b"{}", False, False, 1, False)
    carried.finals.append({"version": 1, "job": ident, "status": "delivered",
                           "final": True, "redelivered": False})
    carried.remaining = 0
    worker._carried.add(carried)
    first = _FakeAmqp()
    worker._publish(first, carried)
    worker._lost(first)                        # the confirm never came
    again = _FakeAmqp()
    worker._publish_again(again)
    published = [_json.loads(p.body) for p in again.sent if p.kind == "results"]
    assert [r["redelivered"] for r in published] == [True]
    assert [r["redelivered"] for r in got] == [True], (
        f"published again marked, on_result got {got}")


def test_a_stop_while_the_broker_is_down_does_not_hammer_it():
    """Stopped (SIGTERM) while the broker is down with a job still carried:
    run()'s reconnect loop skips its pause once stop is set (the wait loop
    ends at once) and goes straight back to _open(): a tight loop of
    connection attempts for the whole drain_timeout, and no _turn, so the
    engine is never stepped and the deliveries in flight make no progress."""

    class _Dummy:
        survives_reconnect = False

        def unconfirmed(self):
            return []

        def close(self):
            pass

    class _Worker(q.Worker):
        opens = 0
        turns = 0

        def _open(self):
            type(self).opens += 1
            if type(self).opens == 1:
                return _Dummy()
            raise ConnectionRefusedError("the broker is down")

        def _serve(self, engine, transport):
            # The connection dies as the worker is stopped with a job carried.
            self._carried.add(_worker._Carried(None, ("x",), b"{}", False, False, 1, False))
            self.stop()
            raise ConnectionResetError("lost")

        def _turn(self, engine, transport, most):
            type(self).turns += 1
            time.sleep(min(most, 0.05))

    worker = _Worker("redis://127.0.0.1:1/0", drain_timeout=2.0)
    started = time.monotonic()
    worker.run(handle_signals=False)
    took = time.monotonic() - started
    assert _Worker.opens < 10 and _Worker.turns > 0, (
        f"{_Worker.opens} connection attempts and {_Worker.turns} engine turns in "
        f"{took:.1f} s of draining")


def _cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_redis_outage_with_a_result_to_publish_does_not_spin(redis_broker, queue_name,
                                                             aiosmtpd_factory):
    """A real worker on Redis: its job's delivery ends while Redis is down,
    so the result waits to be published. For the rest of the outage the
    worker sleeps between attempts (1 s, doubling), not burning a CPU."""
    import threading

    import helpers
    from smtpstate import queue as sq
    from test_queue import _messages, _Slow, _stop, _worker
    server = aiosmtpd_factory(_Slow(2.0))
    sq.enqueue(_messages(1), redis_broker.url, queue_name, host=server.host,
               port=server.port, tls="none")
    worker = _worker(redis_broker.url, queue_name)
    try:
        time.sleep(1.0)                   # taken, its DATA answered 2 s late
        down = threading.Thread(target=redis_broker.restart, kwargs={"down": 6})
        down.start()
        time.sleep(3.5)                   # the delivery is over; Redis still down
        cpu0, t0 = _cpu_seconds(worker.pid), time.monotonic()
        time.sleep(2.0)
        share = (_cpu_seconds(worker.pid) - cpu0) / (time.monotonic() - t0)
        down.join()
        helpers.wait_until(lambda: len(server.handler.messages) >= 1, 30,
                           what="the message delivered")
    finally:
        _stop(worker)
    assert share < 0.5, f"the worker used {share:.0%} of a CPU while Redis was down"
