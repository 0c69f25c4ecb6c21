"""A real S3 API for the storage tests: moto's server on a free local port, dummy credentials."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator

import pytest

BUCKET = "llmray-test"


@pytest.fixture(scope="module")
def s3_env() -> Iterator[dict[str, str]]:
    """Start moto's S3 server, point the AWS variables at it (for this process and any child it starts)."""
    pytest.importorskip("moto.server", reason="moto[server] is in the test extra")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import pyarrow.fs as pafs

    pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], region="us-east-1",
                      allow_bucket_creation=True).create_dir(BUCKET)
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture
def s3_prefix(s3_env: dict[str, str]) -> str:
    """A fresh `s3://` prefix in the test bucket."""
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}"
