"""A local S3-compatible server for the tests: moto's server mode on loopback, in a subprocess.

`S3Server` starts `python -m moto.server` on 127.0.0.1 at a free port, waits until it
answers, and stops it on exit. `env` holds the standard AWS variables that point any client
at it (s3fs/botocore honour AWS_ENDPOINT_URL); set them in the process and in Ray's
`runtime_env` so the workers reach the same server. moto keeps the objects in memory.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request

from .conftest import free_ports


class S3Server:
    def __init__(self, startup_timeout_s: float = 30.0):
        (self.port,) = free_ports(1)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
        }
        self.timeout = startup_timeout_s
        self.proc: subprocess.Popen | None = None

    def start(self) -> "S3Server":
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, **self.env},
        )
        deadline = time.monotonic() + self.timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with code {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto server did not answer on {self.endpoint}")
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def s3_with_bucket(bucket: str):
    """A running server with one bucket, the AWS_* variables pointing this process (and its
    children) at it for the block; -> (server, an s3fs filesystem on it)."""
    import pytest
    import s3fs

    with S3Server() as server, pytest.MonkeyPatch.context() as mp:
        for k, v in server.env.items():
            mp.setenv(k, v)
        mp.delenv("AWS_PROFILE", raising=False)
        s3fs.S3FileSystem.clear_instance_cache()  # a cached client made before would not know the endpoint
        fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
        fs.mkdir(bucket)
        try:
            yield server, fs
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
