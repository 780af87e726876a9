"""Shared helpers for the end-to-end tests: run `qshard serve` on loopback with ephemeral
ports, wait for it, scrape /metrics, stop it. Standard library only, so that the tests that
need no gRPC run on any Python 3."""

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

SKIP = 77  # ctest SKIP_RETURN_CODE


def fail(msg):
    print("FAIL: " + msg, file=sys.stderr)
    sys.exit(1)


class Server:
    """A `qshard serve` child on 127.0.0.1 with --port 0 / --metrics-port 0."""

    LISTEN = re.compile(r"listening on ([^ ]+):(\d+) metrics [^ ]+:(-?\d+)\n")

    def __init__(self, qshard, model, extra=()):
        self.args = [qshard, "serve", "--model", model, "--host", "127.0.0.1", "--port", "0",
                     "--metrics-port", "0", "--kv-cache-memory-bytes", "64M",
                     "--shutdown-timeout", "5", *extra]
        self.proc = None
        self.port = None
        self.metrics_port = None
        self._err = []
        self._lock = threading.Lock()

    def __enter__(self):
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            m = self.LISTEN.search(self.stderr())
            if m:
                self.port, self.metrics_port = int(m.group(2)), int(m.group(3))
                break
            if self.proc.poll() is not None:
                fail("qshard serve exited early:\n" + self.stderr())
            time.sleep(0.02)
        else:
            fail("qshard serve did not report its ports:\n" + self.stderr())
        # Ready when /metrics shows the model's info gauge (set once the model is loaded).
        deadline = time.monotonic() + 30
        while "qshard_kv_cache_info{" not in self.scrape():
            if time.monotonic() > deadline:
                fail("model not loaded in time:\n" + self.stderr())
            time.sleep(0.05)
        return self

    def _drain(self):
        for line in self.proc.stderr:
            with self._lock:
                self._err.append(line)

    def stderr(self):
        with self._lock:
            return "".join(self._err)

    @property
    def address(self):
        return "127.0.0.1:%d" % self.port

    def scrape(self):
        try:
            with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % self.metrics_port,
                                        timeout=5) as r:
                return r.read().decode()
        except OSError:
            return ""

    def stop(self, timeout=20):
        """SIGTERM, wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            fail("qshard serve did not exit within %ss after SIGTERM:\n%s" %
                 (timeout, self.stderr()))

    def __exit__(self, *exc):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def metric_values(text, name):
    """{labels string: value} of every series of one metric in an exposition."""
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        rest = line[len(name):]
        if rest[:1] not in ("{", " "):
            continue
        labels, _, value = rest.rpartition(" ")
        out[labels.strip()] = float(value)
    return out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def temp_dir(prefix):
    return tempfile.mkdtemp(prefix=prefix)
