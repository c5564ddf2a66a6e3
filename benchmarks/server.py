"""``nil index serve`` in its own process, for tests and benchmarks: start, wait for /healthz, stop."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """``python -m cli index serve --index DIR --port P --device cpu ARGS`` logging to ``log``.

    ``token`` is passed as NIL_TOKEN (None: the service runs without one); ``env`` adds variables.
    :meth:`wait_ready` polls ``/healthz`` until the service answers; :meth:`stop` sends SIGTERM
    (graceful shutdown) and returns the exit code."""

    def __init__(self, index_dir: Path, log: Path, *args: str, token: str | None = None,
                 env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(log)
        environ = {k: v for k, v in os.environ.items() if k != "NIL_TOKEN"} | (env or {})
        if token:
            environ["NIL_TOKEN"] = token
        cmd = [sys.executable, "-m", "cli", "index", "serve", "--index", str(index_dir), "--port", str(self.port),
               "--device", "cpu", *args]
        self.command = " ".join(shlex.quote(c) for c in cmd)
        self._fh = open(self.log, "w")
        self.proc = subprocess.Popen(cmd, cwd=CHECKOUT, env=environ, stdout=self._fh, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 300) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.proc.returncode} before it was ready:\n"
                                   f"{self.log.read_text()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server was not ready after {timeout:.0f} s:\n{self.log.read_text()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._fh.close()
        return self.proc.returncode
