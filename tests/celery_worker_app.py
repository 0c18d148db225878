"""The Celery app of tests/test_celery.py: the smtpstate task on a private
RabbitMQ node, for real ``celery worker`` processes (``-A
celery_worker_app``, broker and queue from the environment) and for the
test itself (``make_app``), which sends batches and reads their results.

One connection per destination and a long idle timeout make the Engine's
connection pool observable from the SMTP server: a worker process that
keeps one Engine opens one connection, however many tasks it runs.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Tuple

from celery import Celery

import smtpstate.celery

log = logging.getLogger("celery_worker_app")


def _on_result(record: Dict[str, Any]) -> None:
    # The worker's log is what the tests can see of the hook.
    log.info("on_result: job %s %s after %d attempt(s)", record["job"], record["status"],
             record["attempts"])


def make_app(broker_url: str, queue: str) -> Tuple[Celery, Any]:
    app = Celery("smtpstate_tests", broker=broker_url, backend="rpc://")
    app.conf.update(
        task_default_queue=queue,
        # Publisher confirms for every task sent, the retries included.
        broker_transport_options={"confirm_publish": True},
        broker_connection_retry_on_startup=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=True,
    )
    task = smtpstate.celery.register(app, schedule=(2.0,), max_age=3600.0,
                                     on_result=_on_result, max_connections=10,
                                     max_per_destination=1, idle_timeout=120.0)
    return app, task


if os.environ.get("SMTPSTATE_TEST_BROKER"):
    app, deliver = make_app(os.environ["SMTPSTATE_TEST_BROKER"],
                            os.environ["SMTPSTATE_TEST_QUEUE"])


# ---------------------------------------------------------------------------
# Real worker processes, for the tests
# ---------------------------------------------------------------------------


class CeleryWorker:
    """``python -m celery -A <app> worker`` as a subprocess, its log in a
    file (a pipe nobody reads while it runs could fill and stall it).

    Args:
        app: the ``-A`` argument.
        cwd: where the app module is found.
        env: extra environment variables (the broker, the queue).
        pool, concurrency: the worker's pool.
    """

    def __init__(self, app: str, cwd: str, env: Dict[str, str], *, pool: str = "prefork",
                 concurrency: int = 2) -> None:
        import subprocess
        import sys
        import tempfile
        import uuid

        self.log_file = tempfile.TemporaryFile()
        cmd = [sys.executable, "-m", "celery", "-A", app, "worker", "--pool", pool,
               "--concurrency", str(concurrency), "--loglevel", "INFO",
               "-n", f"smtpstate-test-{uuid.uuid4().hex[:8]}@%h",
               # Nothing else to meet: a faster start, no chatter.
               "--without-mingle", "--without-gossip", "--without-heartbeat"]
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=dict(os.environ, **env),
                                     stdin=subprocess.DEVNULL, stdout=self.log_file,
                                     stderr=subprocess.STDOUT)

    def log(self) -> str:
        self.log_file.seek(0)
        return self.log_file.read().decode(errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> "CeleryWorker":
        import time
        deadline = time.monotonic() + timeout
        while " ready." not in self.log():
            if self.proc.poll() is not None:
                raise RuntimeError(f"celery worker exited with {self.proc.returncode}:\n"
                                   + self.log()[-3000:])
            if time.monotonic() > deadline:
                raise RuntimeError("celery worker not ready after %.0f s:\n%s"
                                   % (timeout, self.log()[-3000:]))
            time.sleep(0.1)
        return self

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (Celery's warm shutdown) and wait; the exit code."""
        import signal
        import subprocess
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError("celery worker did not stop within %.0f s:\n%s"
                               % (timeout, self.log()[-3000:])) from None
