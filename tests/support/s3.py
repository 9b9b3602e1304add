"""An S3 API server for tests: ``moto_server`` as a separate process on a loopback port.

Product code reaches it only through the endpoint URL, with plain boto3, so the same code
works against AWS, MinIO or Ceph. ``env()`` gives a subprocess (CLI, Celery worker) the
same endpoint and dummy credentials.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from typing import Any

import boto3
import requests
from botocore.config import Config

from tests.support.procs import ServerProcess, ServiceError

REGION = "us-east-1"
ACCESS_KEY = "testing"
SECRET_KEY = "testing"


class S3Server(ServerProcess):
    """``moto_server -H 127.0.0.1 -p PORT``; state lives in that process's memory."""

    name = "moto_server"
    probe_path = "/moto-api/"

    def __init__(self, *, check_credentials: bool = False) -> None:
        """`check_credentials`: refuse every request whose access key moto's IAM does not
        know (INITIAL_NO_AUTH_ACTION_COUNT=0), as AWS refuses an unknown or revoked key;
        the dummy keys of `env()` are then refused."""
        super().__init__()
        self.check_credentials = check_credentials
        binary = shutil.which("moto_server")
        if binary is not None:
            self._argv = [binary]
        elif importlib.util.find_spec("moto.server") is not None:
            self._argv = [sys.executable, "-m", "moto.server"]
        else:
            raise ServiceError(
                "moto_server not found on PATH and moto.server not importable: "
                "pip install 'moto[server]' (the project's test extra)"
            )

    def process_env(self) -> dict[str, str] | None:
        if not self.check_credentials:
            return None
        return {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}

    def command(self, port: int) -> list[str]:
        return [*self._argv, "-H", "127.0.0.1", "-p", str(port)]

    def is_ready(self, response: requests.Response) -> bool:
        return response.status_code == 200

    @property
    def endpoint_url(self) -> str:
        return self.url

    def env(self) -> dict[str, str]:
        """Environment variables that point boto3 in a child process at this server."""
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
        }

    def client(self) -> Any:
        """A boto3 S3 client for this server with dummy credentials."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        )

    def create_bucket(self, name: str) -> str:
        """Create ``name`` (us-east-1, so no location constraint) and return it."""
        self.client().create_bucket(Bucket=name)
        return name

    def reset(self) -> None:
        """Drop every bucket and object: moto's reset endpoint."""
        requests.post(f"{self.url}/moto-api/reset", timeout=10).raise_for_status()
