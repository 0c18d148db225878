"""Private message brokers for the queue tests: a RabbitMQ node and a
redis-server, each on a free loopback port in a temporary directory of its
own, started by the tests (conftest.py's session fixtures) and stopped at
the end of the session. Nothing here touches a system broker.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Dict, Optional

import helpers


class BrokerError(RuntimeError):
    """A private broker did not start; the text has its log's tail."""


def _tail(path: str, limit: int = 3000) -> str:
    try:
        with open(path, "rb") as f:
            return f.read()[-limit:].decode(errors="replace")
    except OSError as e:
        return f"(no log: {e})"


class RabbitServer:
    """A private RabbitMQ node: ``.url`` (amqp://guest:guest@127.0.0.1:PORT//).

    The node's name, ports, database, logs and (empty) plugin list are its
    own (RABBITMQ_* variables), so it runs next to a system RabbitMQ. Run as
    root, Debian's rabbitmq-server switches to the rabbitmq user, so its
    directory is world-writable. Starting takes 5-20 s: one per session.
    """

    SBIN = ("/usr/sbin", "/usr/lib/rabbitmq/bin")

    def __init__(self) -> None:
        self.root: Optional[str] = None
        self.proc: Optional[subprocess.Popen] = None
        self.port = 0
        self.epmd_port = 0
        self.url = ""

    @classmethod
    def unavailable(cls) -> Optional[str]:
        if not helpers.find_program("rabbitmq-server", *cls.SBIN):
            return "rabbitmq-server (Debian package rabbitmq-server) is not installed"
        try:
            import kombu  # noqa: F401
        except ImportError:
            return "kombu is not installed (pip install '.[test]')"
        return None

    def _env(self) -> Dict[str, str]:
        assert self.root is not None
        env = dict(os.environ)
        env.update({
            "RABBITMQ_NODENAME": f"smtpstate-test-{os.getpid()}@localhost",
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(helpers.free_port()),
            # An epmd of its own (Erlang's port mapper, which the node
            # starts), stopped with the node: nothing left running after
            # the tests, and no clash with a system RabbitMQ's.
            "ERL_EPMD_PORT": str(self.epmd_port),
            "RABBITMQ_MNESIA_BASE": os.path.join(self.root, "mnesia"),
            "RABBITMQ_LOG_BASE": os.path.join(self.root, "log"),
            "RABBITMQ_PID_FILE": os.path.join(self.root, "pid"),
            "RABBITMQ_FEATURE_FLAGS_FILE": os.path.join(self.root, "feature_flags"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": os.path.join(self.root, "enabled_plugins"),
        })
        return env

    def start(self, timeout: float = 90.0) -> "RabbitServer":
        why = self.unavailable()
        if why:
            raise BrokerError(why)
        self.root = helpers._private_tempdir("smtpstate-rabbit-")   # rabbitmq user reaches it
        os.chmod(self.root, 0o777)
        with open(os.path.join(self.root, "enabled_plugins"), "w") as f:
            f.write("[].\n")
        os.chmod(os.path.join(self.root, "enabled_plugins"), 0o666)
        self.port = helpers.free_port()
        self.epmd_port = helpers.free_port()
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}//"
        self.log_path = os.path.join(self.root, "server.out")
        return self._launch(timeout)

    def restart(self, down: float = 0.0, timeout: float = 90.0) -> "RabbitServer":
        """Stop the node cleanly, stay down ``down`` seconds, start it
        again on the same port with the same database (durable queues and
        their messages survive)."""
        self._stop_node()
        time.sleep(down)
        return self._launch(timeout)

    def _launch(self, timeout: float) -> "RabbitServer":
        import kombu

        assert self.root is not None
        prog = helpers.find_program("rabbitmq-server", *self.SBIN)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([prog], env=self._env(), stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise BrokerError(f"rabbitmq-server exited with {self.proc.returncode}:\n"
                                  + _tail(self.log_path))
            try:
                conn = kombu.Connection(self.url, connect_timeout=2)
                conn.connect()
                conn.release()
                return self
            except Exception as e:          # not up yet: refused, or AMQP not ready
                if time.monotonic() > deadline:
                    self.stop()
                    raise BrokerError(f"RabbitMQ not ready after {timeout:.0f} s ({e}):\n"
                                      + _tail(self.log_path)) from None
            time.sleep(0.5)

    def stop(self) -> None:
        self._stop_node()
        epmd = helpers.find_program("epmd", "/usr/lib/erlang/bin", "/usr/bin")
        if self.epmd_port and epmd:
            env = dict(os.environ, ERL_EPMD_PORT=str(self.epmd_port))
            subprocess.run([epmd, "-kill"], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=10, check=False)
        if self.root:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def _stop_node(self) -> None:
        # The node (beam.smp) writes its pid file; SIGTERM stops it cleanly.
        if self.root:
            try:
                with open(os.path.join(self.root, "pid")) as f:
                    os.kill(int(f.read().strip()), signal.SIGTERM)
            except (OSError, ValueError):
                pass
        if self.proc is not None:
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            self.proc = None


class RedisServer:
    """A private redis-server on 127.0.0.1: ``.url`` (redis://127.0.0.1:PORT/0)."""

    def __init__(self) -> None:
        self.root: Optional[str] = None
        self.proc: Optional[subprocess.Popen] = None
        self.port = 0
        self.url = ""

    @staticmethod
    def unavailable() -> Optional[str]:
        if not helpers.find_program("redis-server", "/usr/bin", "/usr/sbin"):
            return "redis-server (Debian package redis-server) is not installed"
        try:
            import kombu  # noqa: F401
            import redis  # noqa: F401
        except ImportError:
            return "kombu and redis are not installed (pip install '.[test]')"
        return None

    def start(self, timeout: float = 20.0) -> "RedisServer":
        why = self.unavailable()
        if why:
            raise BrokerError(why)
        self.root = tempfile.mkdtemp(prefix="smtpstate-redis-")
        self.port = helpers.free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log_path = os.path.join(self.root, "server.out")
        return self._launch(timeout)

    def restart(self, down: float = 0.0, timeout: float = 20.0) -> "RedisServer":
        """Stop redis-server (SIGTERM), stay down ``down`` seconds, start it
        again on the same port from its append-only file."""
        self._stop_server()
        time.sleep(down)
        return self._launch(timeout)

    def _launch(self, timeout: float) -> "RedisServer":
        import redis

        assert self.root is not None
        prog = helpers.find_program("redis-server", "/usr/bin", "/usr/sbin")
        with open(self.log_path, "ab") as log:
            # Persistent as docs/queue.md asks of a queue's Redis: every
            # write in the append-only file before it is answered.
            self.proc = subprocess.Popen(
                [prog, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.root,
                 "--save", "", "--appendonly", "yes", "--appendfsync", "always",
                 "--daemonize", "no"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise BrokerError(f"redis-server exited with {self.proc.returncode}:\n"
                                  + _tail(self.log_path))
            try:
                redis.Redis(port=self.port, socket_connect_timeout=1).ping()
                return self
            except redis.RedisError as e:
                if time.monotonic() > deadline:
                    self.stop()
                    raise BrokerError(f"redis-server not ready ({e}):\n"
                                      + _tail(self.log_path)) from None
            time.sleep(0.1)

    def stop(self) -> None:
        self._stop_server()
        if self.root:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def _stop_server(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
