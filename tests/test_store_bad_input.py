"""Bad stores and bad samples fail loudly, naming the shard (and sample) — never silently wrong data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from arpipe.pipeline.errors import UserError
from arpipe.stages.store import ShardWriter, StoreError, StoreWriter, TokenStore, write_manifest


@pytest.fixture
def store_dir(tmp_path):
    uri = tmp_path / "store"
    with StoreWriter(str(uri), vocab_size=1000, samples_per_shard=10) as w:
        for i in range(30):
            w.append(np.arange(8) + i, key=f"sample-{i}", modality="image", condition=i % 4)
    return uri


def test_a_truncated_shard_is_named_when_the_store_opens(store_dir):
    shard = store_dir / "shard-000001.bin"
    shard.write_bytes(shard.read_bytes()[:-6])
    with pytest.raises(StoreError) as err:
        TokenStore.open(str(store_dir))
    msg = str(err.value)
    assert "shard-000001.bin" in msg and "truncated" in msg and "154 bytes, the manifest says 160" in msg
    assert isinstance(err.value, UserError) and err.value.exit_code == 2
    assert "\n" not in msg and "re-copy" in msg


def test_a_checksum_mismatch_is_named_by_verify(store_dir):
    shard = store_dir / "shard-000002.bin"
    data = bytearray(shard.read_bytes())
    data[5] ^= 0xFF  # same size: only the checksum can tell
    shard.write_bytes(bytes(data))
    store = TokenStore.open(str(store_dir))
    problems = store.verify()
    assert len(problems) == 1
    assert "shard '000002': token checksum mismatch" in str(problems[0])
    assert str(problems[0]).startswith(str(shard))


def test_a_missing_index_is_named(store_dir):
    (store_dir / "shard-000000.idx.arrow").unlink()
    with pytest.raises(StoreError, match=r"shard-000000\.idx\.arrow.*index file shard-000000\.idx\.arrow is missing"):
        TokenStore.open(str(store_dir))


def test_a_tampered_index_is_named_when_its_shard_is_first_read(store_dir):
    index = store_dir / "shard-000002.idx.arrow"
    data = bytearray(index.read_bytes())
    data[-40] ^= 0x01
    index.write_bytes(bytes(data))
    store = TokenStore.open(str(store_dir))
    assert store[3].key == "sample-3"  # other shards still read
    with pytest.raises(StoreError, match="shard '000002': index does not match the manifest"):
        store[25]


def test_a_manifest_of_a_newer_format_version_is_refused(store_dir):
    path = store_dir / "manifest.json"
    data = json.loads(path.read_text())
    data["format_version"] = 99
    data["field_from_the_future"] = True
    path.write_text(json.dumps(data))
    with pytest.raises(StoreError, match="manifest format version 99 is newer than this arpipe reads .1.; "
                                         "upgrade arpipe"):
        TokenStore.open(str(store_dir))


def test_a_missing_manifest_says_the_store_was_never_committed(tmp_path):
    w = ShardWriter(str(tmp_path / "s"), "p0", vocab_size=10)
    w.append([1], key="a", modality="image")
    w.commit()  # shards written, manifest not yet
    with pytest.raises(StoreError, match="no manifest.json: not a token store, or its writer never finished"):
        TokenStore.open(str(tmp_path / "s"))


def test_a_token_that_does_not_fit_the_dtype_names_shard_and_sample(tmp_path):
    w = ShardWriter(str(tmp_path / "s"), "part-7", dtype="uint16")
    w.append([1, 2], key="ok", modality="image")
    with pytest.raises(StoreError) as err:
        w.append(np.array([[3, 70000], [1, 2]]), key="cat.png", modality="image")
    msg = str(err.value)
    assert "shard-part-7.bin sample 'cat.png'" in msg
    assert "token 70000 at position 1 does not fit uint16" in msg
    with pytest.raises(StoreError, match="sample 'neg': token -1 at position 0 does not fit uint16"):
        w.append([-1], key="neg", modality="image")


def test_a_token_outside_the_vocabulary_names_shard_and_sample(tmp_path):
    w = ShardWriter(str(tmp_path / "s"), "p3", vocab_size=512)
    with pytest.raises(StoreError, match=r"shard-p3\.bin sample 'img-9': token 512 at position 2 does not fit "
                                         r"uint16 \(vocab_size 512: ids 0\.\.511\)"):
        w.append([0, 511, 512], key="img-9", modality="image")
    w.abort()


def test_a_shard_gone_after_the_writer_finished_is_refused_at_commit(tmp_path):
    uri = str(tmp_path / "s")
    w = ShardWriter(uri, "a", vocab_size=10)
    w.append([1, 2], key="x", modality="image")
    info = w.commit()
    (tmp_path / "s" / "shard-a.bin").unlink()
    with pytest.raises(StoreError, match="shard-a.bin is missing, its writer recorded 4 bytes"):
        write_manifest(uri, [info], vocab=10)
    assert not (tmp_path / "s" / "manifest.json").exists()
