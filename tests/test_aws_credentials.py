"""AWS the standard way: temporary credentials, profiles and the configured region reach every S3 access.

A user with STS/SSO credentials exports a key, a secret and a session token (or names a profile that
holds them); arpipe's storage and the pyarrow filesystem Ray Train writes checkpoints through must
both sign with all three. The server here is SeaweedFS with its STS: it hands out the temporary
credentials and refuses a request that carries the temporary key without its session token.
"""

from __future__ import annotations

import json
import os
import pickle
import threading
import uuid
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from botocore.exceptions import ClientError

from arpipe.pipeline.storage import (
    DEFAULT_REGION,
    aws_region,
    pyarrow_s3,
    s3_client,
    storage_for,
)
from arpipe.stages.train import _ray_storage


@pytest.fixture(scope="module")
def sts_server(tmp_path_factory):
    """A SeaweedFS server on 127.0.0.1 that issues and checks session tokens, with one bucket."""
    from s3server import StsS3Server

    server = StsS3Server(tmp_path_factory.mktemp("s3-sts")).start()
    server.bucket = server.make_bucket(f"sts-{uuid.uuid4().hex[:12]}")
    yield server
    server.stop()


@pytest.fixture
def aws_home(monkeypatch, tmp_path):
    """No AWS_* variable of the outer shell, and ~/.aws files that the test writes (absent until then)."""
    for name in [name for name in os.environ if name.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")   # no instance-role probe when nothing resolves
    return tmp_path


def exported(monkeypatch, variables: dict[str, str]) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)


def round_trip(prefix: str) -> None:
    """What a run does with its storage: write, read (whole and a range), list, delete a prefix."""
    storage = storage_for(prefix)
    storage.write_bytes(f"{prefix}/a/outputs.json", b'{"ok": true}')
    storage.write_text(f"{prefix}/b.txt", "hello")
    assert storage.read_bytes(f"{prefix}/a/outputs.json") == b'{"ok": true}'
    assert storage.read_range(f"{prefix}/b.txt", 1, 3) == b"ell"
    assert sorted(e.relpath for e in storage.list(prefix)) == ["a/outputs.json", "b.txt"]
    storage.delete_prefix(prefix)
    assert list(storage.list(prefix)) == []


def checkpoint_round_trip(stage_uri: str) -> None:
    """What Ray Train does with `_ray_storage`: a file written and read back, also by a worker's copy."""
    storage_path, fs = _ray_storage(stage_uri)
    with fs.open_output_stream(f"{storage_path}/train/checkpoint_000000/rank0.pt") as f:
        f.write(b"weights")
    worker_fs = pickle.loads(pickle.dumps(fs))   # Ray sends the filesystem to each worker pickled
    with worker_fs.open_input_stream(f"{storage_path}/train/checkpoint_000000/rank0.pt") as f:
        assert f.read() == b"weights"
    fs.delete_dir(storage_path)


def test_exported_temporary_credentials_reach_storage_and_checkpoints(sts_server, aws_home, monkeypatch):
    credentials = sts_server.assume_role()
    exported(monkeypatch, {**credentials, "AWS_ENDPOINT_URL": sts_server.endpoint})
    assert credentials["AWS_ACCESS_KEY_ID"].startswith("ASIA")   # temporary, not the server's own key

    round_trip(f"{sts_server.bucket}/env-{uuid.uuid4().hex[:8]}")
    checkpoint_round_trip(f"{sts_server.bucket}/train/{uuid.uuid4().hex[:16]}")


def test_a_profile_with_temporary_credentials_and_its_region(sts_server, aws_home, monkeypatch):
    credentials = sts_server.assume_role("arpipe-profile")
    (aws_home / "aws-credentials").write_text(
        "[research]\n"
        f"aws_access_key_id = {credentials['AWS_ACCESS_KEY_ID']}\n"
        f"aws_secret_access_key = {credentials['AWS_SECRET_ACCESS_KEY']}\n"
        f"aws_session_token = {credentials['AWS_SESSION_TOKEN']}\n")
    (aws_home / "aws-config").write_text("[profile research]\nregion = eu-west-3\n")
    exported(monkeypatch, {"AWS_PROFILE": "research", "AWS_ENDPOINT_URL": sts_server.endpoint})

    assert storage_for(sts_server.bucket).client.meta.region_name == "eu-west-3"
    round_trip(f"{sts_server.bucket}/profile-{uuid.uuid4().hex[:8]}")
    stage_uri = f"{sts_server.bucket}/train/{uuid.uuid4().hex[:16]}"
    assert _ray_storage(stage_uri)[1].region == "eu-west-3"
    checkpoint_round_trip(stage_uri)


@pytest.fixture
def container_role(sts_server):
    """An ECS-style container credentials endpoint on 127.0.0.1 serving the server's temporary credentials;
    yields (its URL, the paths it was asked for)."""
    credentials = sts_server.assume_role("container")
    body = json.dumps({"AccessKeyId": credentials["AWS_ACCESS_KEY_ID"],
                       "SecretAccessKey": credentials["AWS_SECRET_ACCESS_KEY"],
                       "Token": credentials["AWS_SESSION_TOKEN"], "Expiration": "2099-01-01T00:00:00Z"}).encode()
    asked: list[str] = []

    class Endpoint(BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Endpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/role", asked
    server.shutdown()
    server.server_close()


def test_a_container_role_is_renewed_by_pyarrow_itself(sts_server, aws_home, monkeypatch, container_role):
    """Roles of the machine (instance, container, EKS web identity) renew themselves in long runs: pyarrow
    gets no snapshot of their keys but resolves them on its own, wherever the filesystem is unpickled."""
    url, asked = container_role
    exported(monkeypatch, {"AWS_CONTAINER_CREDENTIALS_FULL_URI": url, "AWS_ENDPOINT_URL": sts_server.endpoint})

    round_trip(f"{sts_server.bucket}/container-{uuid.uuid4().hex[:8]}")
    boto3_asked = len(asked)
    stage_uri = f"{sts_server.bucket}/train/{uuid.uuid4().hex[:16]}"
    options = _ray_storage(stage_uri)[1].__reduce__()[1][0]   # what Ray pickles for the workers: no keys
    assert not options["access_key"] and not options["session_token"]
    checkpoint_round_trip(stage_uri)
    assert boto3_asked >= 1 and len(asked) > boto3_asked   # pyarrow asked the endpoint itself


@pytest.mark.parametrize("token", ["missing", "changed"])
def test_the_temporary_key_without_its_session_token_is_refused(sts_server, aws_home, monkeypatch, token):
    """The check the two tests above rely on: were the token dropped on the way, the server would say no."""
    credentials = sts_server.assume_role()
    if token == "missing":
        del credentials["AWS_SESSION_TOKEN"]
    else:
        credentials["AWS_SESSION_TOKEN"] = sts_server.assume_role("another-session")["AWS_SESSION_TOKEN"]
    exported(monkeypatch, {**credentials, "AWS_ENDPOINT_URL": sts_server.endpoint})

    with pytest.raises(ClientError, match="InvalidAccessKeyId"):
        storage_for(sts_server.bucket).write_bytes(f"{sts_server.bucket}/refused/x", b"x")
    storage_path, fs = _ray_storage(f"{sts_server.bucket}/train/{uuid.uuid4().hex[:16]}")
    with pytest.raises(OSError, match="INVALID_ACCESS_KEY_ID"):
        with fs.open_output_stream(f"{storage_path}/refused") as f:
            f.write(b"x")


def test_the_region_comes_from_the_standard_places(aws_home, monkeypatch):
    exported(monkeypatch, {"AWS_ACCESS_KEY_ID": "AKIAREGIONTEST", "AWS_SECRET_ACCESS_KEY": "secret"})
    assert aws_region() == DEFAULT_REGION == "us-east-1"   # nothing configured: AWS's default

    config = aws_home / "config-with-regions"   # a new file, as a new shell would see it (sessions are cached)
    config.write_text("[default]\nregion = ap-southeast-2\n[profile eu]\nregion = eu-north-1\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    assert aws_region() == "ap-southeast-2"   # ~/.aws/config, not overridden by us-east-1
    assert s3_client().meta.region_name == pyarrow_s3().region == "ap-southeast-2"
    monkeypatch.setenv("AWS_PROFILE", "eu")
    assert aws_region() == "eu-north-1"
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-central-1")
    assert aws_region() == "eu-central-1"
    monkeypatch.setenv("AWS_REGION", "sa-east-1")   # read first, as the AWS CLI and the other SDKs do
    assert s3_client().meta.region_name == pyarrow_s3().region == "sa-east-1"
