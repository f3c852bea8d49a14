"""The storage interface behaves the same on a local folder and on a real S3 server."""

from __future__ import annotations

import pytest

from arpipe.pipeline.storage import join, storage_for


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket") + "/prefix"


def test_write_read_list_delete(root):
    storage = storage_for(root)
    storage.write_bytes(join(root, "a/b.bin"), b"0123456789")
    storage.write_text(join(root, "c.json"), "{}")
    assert storage.read_range(join(root, "a/b.bin"), 3, 4) == b"3456"
    assert storage.read_range(join(root, "a/b.bin"), 8, 10) == b"89"
    assert storage.size(join(root, "a/b.bin")) == 10
    assert storage.size(join(root, "missing")) is None
    assert sorted((e.relpath, e.size) for e in storage.list(root)) == [("a/b.bin", 10), ("c.json", 2)]
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(join(root, "missing"))
    storage.delete(join(root, "c.json"))
    storage.delete(join(root, "c.json"))
    assert [e.relpath for e in storage.list(root)] == ["a/b.bin"]
    storage.delete_prefix(root)
    assert list(storage.list(root)) == []


def test_create_exclusive_admits_one_writer(root):
    storage = storage_for(root)
    lock = join(root, "lock")
    assert storage.create_exclusive(lock, b"first")
    assert not storage.create_exclusive(lock, b"second")
    assert storage.read_bytes(lock) == b"first"


def test_put_and_get_file(root, tmp_path):
    storage = storage_for(root)
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 100_000)
    storage.put_file(src, join(root, "big.bin"))
    dst = tmp_path / "dst.bin"
    storage.get_file(join(root, "big.bin"), dst)
    assert dst.read_bytes() == src.read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
