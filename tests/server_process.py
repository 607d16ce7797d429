"""A real `python -m hybridrag serve` process on a free loopback port, for the server's tests."""
import signal
import socket
import subprocess
import sys
import time

import httpx

KEY = "test-key-0123"


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """`python -m hybridrag serve --kb state ...` on a free port; stop() sends SIGTERM, kill() SIGKILL."""

    def __init__(self, state, *extra, docs=None, config=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "hybridrag", "serve", "--kb", str(state), "--port", str(self.port),
                   "--api-key", KEY, *extra]
        if docs is not None:
            command += ["--docs", str(docs), "--config", str(config)]
        self.log = open(state.parent / f"server-{self.port}.log", "w+")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited with {self.process.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.kill()
        raise AssertionError(f"the server did not come up in 240 s:\n{self.output()}")

    def output(self):
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-4000:]

    def stop(self):
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=60)

    def kill(self):
        self.process.kill()
        self.process.wait(timeout=60)
