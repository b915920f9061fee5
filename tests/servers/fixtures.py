"""pytest fixtures for the test servers; tests/conftest.py loads them with
`pytest_plugins = ["servers.fixtures"]`."""

from __future__ import annotations

import pytest

from servers.hub import HubServer
from servers.recorder import RecordingProxy
from servers.seaweed import SeaweedS3


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> SeaweedS3:
    """One SeaweedFS S3 server for the session. A test may stop() and start() it (same ports,
    same data); it must leave it started."""
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_recorder(s3_server) -> RecordingProxy:
    """A recording proxy in front of s3_server, for one test: point clients at
    s3_recorder.endpoint_url (s3_server.env(s3_recorder.endpoint_url)), then read
    s3_recorder.requests / ranges("bucket/key"); fail_next(n) injects 503 SlowDown."""
    proxy = RecordingProxy(s3_server.endpoint_url)
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture(scope="session")
def hub_server() -> HubServer:
    """The local Hub (no repos yet: add_repo them). Point huggingface_hub at it inside a test
    with servers.hub.use_hub(monkeypatch, hub_server)."""
    server = HubServer()
    try:
        yield server
    finally:
        server.stop()
