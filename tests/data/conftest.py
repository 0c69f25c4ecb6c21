"""The storage tests' S3 server (moto) for the data tests that resolve `s3://` sources."""

from tests.storage.conftest import s3_env, s3_prefix  # noqa: F401
