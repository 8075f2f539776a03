"""redact_uri: no credential of a URI reaches a log, manifest or report."""

import pytest

from pipelines.artifacts import model_identity
from pipelines.storage import redact_uri, redact_uris


@pytest.mark.parametrize("uri, expected", [
    ("s3://AKIAKEY:s3cr3t@bucket/models/m", "s3://bucket/models/m"),
    ("s3://AKIAKEY:se/cr+et@bucket/models/m", "s3://bucket/models/m"),  # an unencoded secret with a '/'
    ("https://user:pw@host.example/a/b.parquet", "https://host.example/a/b.parquet"),
    ("https://user@host.example/a", "https://host.example/a"),
    ("https://:pw@host.example:8443/a", "https://host.example:8443/a"),
    ("https://bucket.s3.amazonaws.com/k.parquet?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F20261122"
     "&X-Amz-Signature=abc123&X-Amz-Security-Token=tok", "https://bucket.s3.amazonaws.com/k.parquet?REDACTED"),
    ("https://acct.blob.core.windows.net/c/x.parquet?sv=2022&sig=abc%3D", "https://acct.blob.core.windows.net/c/x.parquet?REDACTED"),
    ("https://storage.googleapis.com/b/o?GoogleAccessId=a&Signature=s&token=t", "https://storage.googleapis.com/b/o?REDACTED"),
    ("https://host/p?a=1#access_token=t", "https://host/p?REDACTED#REDACTED"),
    ("simplecache::s3://key:secret@bucket/x", "simplecache::s3://bucket/x"),
    ("http://https://user:pw@host/a", "http://host/a"),  # what Location.uri() gives for an https Location
])
def test_credentials_and_queries_are_removed(uri, expected):
    assert redact_uri(uri) == expected
    assert redact_uri(expected) == expected  # idempotent


@pytest.mark.parametrize("uri", [
    "/data/models/m", "relative/dir", "outputs/score", "/tmp/a?b#c",  # plain paths: untouched, even with ? or #
    "s3://bucket/date=2026-11-22/", "gs://bucket/user@example.com/file.parquet", "https://host:8080/a@b",
    "memory://x/y", "file:///tmp/x", "",
])
def test_uris_without_credentials_are_untouched(uri):
    assert redact_uri(uri) == uri


def test_nested_values_and_the_model_identity(tmp_path, tiny_model_dir):
    config = {"model": "s3://k:s@b/m", "paths": ["https://h/x?sig=1", "/local"], "n": 3, "label_columns": {"a": "b"}}
    assert redact_uris(config) == {"model": "s3://b/m", "paths": ["https://h/x?REDACTED", "/local"], "n": 3, "label_columns": {"a": "b"}}
    assert config["model"] == "s3://k:s@b/m"  # a copy
    identity = model_identity(tiny_model_dir, "s3://AKIAKEY:s3cr3t@bucket/models/tiny")
    assert identity["uri"] == "s3://bucket/models/tiny" and "s3cr3t" not in str(identity)


def test_uris_inside_error_messages_and_log_lines_are_redacted(caplog):
    import logging

    from pipelines.storage import RedactingFilter, redact_text

    text = "cannot read Parquet file 's3://AKIA:s3cr3t@bucket/in.parquet' or https://h/x?X-Amz-Signature=abc (see /tmp/p)"
    out = redact_text(text)
    assert "s3cr3t" not in out and "abc" not in out and "s3://bucket/in.parquet" in out and "/tmp/p" in out
    handler = logging.StreamHandler()
    handler.addFilter(RedactingFilter())
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "reading %s", ("s3://k:secret@b/p",), None)
    assert handler.filters[0].filter(record) and "secret" not in record.getMessage()
