"""A real S3-compatible server for tests: moto in server mode on 127.0.0.1.

Our code talks to it over HTTP through s3fs exactly as it would to AWS; nothing of ours is
mocked.  ``S3Server.storage_options`` are the s3fs options a store on it needs.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
import uuid
from typing import Any

KEY = SECRET = "testing"
REGION = "us-east-1"


class S3Server:
    """Start/stop a ``moto.server.ThreadedMotoServer`` and make buckets on it.

    ``process=True`` runs moto in a process of its own instead (``python -m moto.server``),
    as a real server would be: its work then never holds this process's GIL, and
    :meth:`cpu_seconds` measures it (benchmarks).
    """

    def __init__(self, process: bool = False) -> None:
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no per-request lines
        self._server: Any = None
        self._proc: subprocess.Popen[bytes] | None = None
        if not process:
            from moto.server import ThreadedMotoServer

            self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.endpoint_url = ""

    def start(self) -> S3Server:
        if self._server is not None:
            self._server.start()
            host, port = self._server.get_host_and_port()
            self.endpoint_url = f"http://{host}:{port}"
            return self
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("the moto server process did not start") from None
                time.sleep(0.1)
        self.endpoint_url = f"http://127.0.0.1:{port}"
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
        elif self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            self._proc = None

    def cpu_seconds(self) -> float | None:
        """CPU time the server process has used (user + system), None when in-process."""
        if self._proc is None:
            return None
        import psutil

        t = psutil.Process(self._proc.pid).cpu_times()
        return t.user + t.system

    @property
    def storage_options(self) -> dict[str, Any]:
        return {
            "endpoint_url": self.endpoint_url,
            "key": KEY,
            "secret": SECRET,
            "client_kwargs": {"region_name": REGION},
            # Each call sees the bucket as it is now (no stale directory listings).
            "use_listings_cache": False,
        }

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, aws_access_key_id=KEY,
            aws_secret_access_key=SECRET, region_name=REGION,
        )

    def new_bucket(self) -> str:
        name = f"test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key under ``prefix`` (listed by boto3, independently of s3fs)."""
        out: list[str] = []
        pages = self.client().get_paginator("list_objects_v2")
        for page in pages.paginate(Bucket=bucket, Prefix=prefix):
            out.extend(obj["Key"] for obj in page.get("Contents", []))
        return out
