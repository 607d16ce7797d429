"""A real `python -m hybridrag serve` process on a free loopback port, for the server's tests."""
import signal
import subprocess
import sys

from benchmarks.server_load import free_port, wait_until_healthy

KEY = "test-key-0123"


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
        try:
            wait_until_healthy(self.process, self.url, 240, self.log.name)
        except RuntimeError as failed:
            raise AssertionError(f"{failed}:\n{self.output()}") from None

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
