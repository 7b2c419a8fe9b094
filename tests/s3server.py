"""A real S3-compatible server for tests: moto in server mode on 127.0.0.1.

Our code talks to it over HTTP through s3fs exactly as it would to AWS; nothing of ours is
mocked.  ``S3Server.storage_options`` are the s3fs options a store on it needs.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

KEY = SECRET = "testing"
REGION = "us-east-1"


class S3Server:
    """Start/stop a ``moto.server.ThreadedMotoServer`` and make buckets on it."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no per-request lines
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.endpoint_url = ""

    def start(self) -> S3Server:
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        self._server.stop()

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
