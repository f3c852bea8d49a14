"""Locks on S3 stores that ignore conditional writes: arpipe asks the server, and refuses with one line.

A stage's lock is created with ``If-None-Match: *``. On a store that ignores the header every
create succeeds, so two runs would both hold the lock. The first lock on a store probes it;
SeaweedFS (the suite's real S3 server) honours the header, the store in ``s3proxy.py`` does not.
"""

from __future__ import annotations

import uuid

import pytest
from helpers import arpipe, write
from s3proxy import IgnoringProxy

from arpipe.pipeline.errors import UserError
from arpipe.pipeline.lock import PROBES, SINGLE_WRITER_ENV, StageLock
from arpipe.pipeline.storage import join, storage_for


def refusal(bucket_uri: str, endpoint: str) -> str:
    """The line a user reads when the store cannot make a lock exclusive."""
    return (f"{bucket_uri} at {endpoint}: this S3 store does not honour conditional writes (If-None-Match), so "
            "two runs could both take a stage's lock and write the same output; use a store that honours them "
            f"(AWS S3, MinIO, SeaweedFS), or, if only one run at a time ever writes this storage, set "
            f"{SINGLE_WRITER_ENV}=1")


def objects(bucket_uri: str) -> list[str]:
    return sorted(entry.relpath for entry in storage_for(bucket_uri).list(bucket_uri))


@pytest.fixture(autouse=True)
def no_opt_out(monkeypatch):
    monkeypatch.delenv(SINGLE_WRITER_ENV, raising=False)


@pytest.fixture(scope="module")
def ignoring():
    proxy = IgnoringProxy().start()
    yield proxy
    proxy.stop()


@pytest.fixture
def ignoring_bucket(ignoring, monkeypatch) -> str:
    """A fresh bucket on the store that ignores If-None-Match; the AWS variables point at it."""
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    for key, value in ignoring.env.items():
        monkeypatch.setenv(key, value)
    name = f"t-{uuid.uuid4().hex[:12]}"
    storage_for(f"s3://{name}").client.create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(params=["local", "s3"])
def honouring_root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "runs")
    return request.getfixturevalue("s3_bucket")


def test_a_store_that_honours_conditional_writes_locks_one_run_at_a_time(honouring_root):
    out = join(honouring_root, "runs/fit/0123abcd")
    first, second = StageLock(out, "run-a"), StageLock(out, "run-b")
    assert first.try_acquire() is None
    holder = second.try_acquire()
    assert holder is not None and holder.run_id == "run-a"
    # the probe (S3) left nothing behind: the lock is the only object
    assert objects(honouring_root) == ["runs/fit/0123abcd/.arpipe/lock"]
    first.release()
    assert second.try_acquire() is None
    second.release()
    assert objects(honouring_root) == []


def test_the_test_store_ignores_conditional_writes(ignoring_bucket):
    # what makes such a store dangerous: both "exclusive" creates succeed, the second overwrites
    storage = storage_for(ignoring_bucket)
    lock = join(ignoring_bucket, "lock")
    assert storage.create_exclusive(lock, b"run-a") and storage.create_exclusive(lock, b"run-b")
    assert storage.read_bytes(lock) == b"run-b"


def test_arpipe_run_refuses_a_store_that_ignores_conditional_writes(tmp_path, ignoring, ignoring_bucket):
    write(tmp_path, {
        "steps.py": "def make(config, inputs, out_dir):\n    return {'out': 1}\n",
        "pipeline.yaml": f"""
            name: on-ignoring-store
            storage: {ignoring_bucket}/runs
            stages:
              a: {{kind: python, callable: "steps:make"}}
            """})
    proc = arpipe("run", "pipeline.yaml", cwd=tmp_path, env={**ignoring.env, "AWS_ENDPOINT_URL_S3": ignoring.endpoint})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [f"arpipe: error: {refusal(ignoring_bucket, ignoring.endpoint)}"]
    assert "done" not in proc.stdout
    assert objects(ignoring_bucket) == []   # nothing written: no stage, no ledger, no probe left


def test_stage_lock_asks_once_then_refuses_unless_the_user_vouches_for_one_writer(ignoring, ignoring_bucket,
                                                                               monkeypatch):
    out = join(ignoring_bucket, "runs/fit/0123abcd")
    before = ignoring.dropped
    with pytest.raises(UserError) as err:
        StageLock(out, "run-a").try_acquire()
    assert str(err.value) == refusal(ignoring_bucket, ignoring.endpoint)
    assert ignoring.dropped - before == 2 * PROBES   # each probe: a create and a second create, both conditional
    with pytest.raises(UserError):
        StageLock(out, "run-b").try_acquire()
    assert ignoring.dropped - before == 2 * PROBES   # the verdict is kept for the process
    assert objects(ignoring_bucket) == []

    monkeypatch.setenv(SINGLE_WRITER_ENV, "1")
    lock = StageLock(out, "run-a")
    assert lock.try_acquire() is None
    assert objects(ignoring_bucket) == ["runs/fit/0123abcd/.arpipe/lock"]
    holder = StageLock(out, "run-b").try_acquire()   # a run that starts later still waits
    assert holder is not None and holder.run_id == "run-a"
    lock.release()
    assert objects(ignoring_bucket) == []
