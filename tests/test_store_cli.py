"""``arpipe store info|verify|head|export``: what a user sees in the shell."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from helpers import json_output

from arpipe.stages.store import StoreWriter, TokenizerRef
from arpipe.stages.store.cli import main, register

ROOT = Path(__file__).resolve().parent.parent
ARPIPE = Path(sys.executable).with_name("arpipe")


def arpipe(*args: str) -> subprocess.CompletedProcess:
    """Run ``arpipe store ...`` as a user would; without an installed ``arpipe``, through the module's own entry."""
    cmd = [str(ARPIPE)] if ARPIPE.exists() else [sys.executable, "-m", "arpipe.stages.store.cli"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([*cmd, "store", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def store(tmp_path):
    uri = tmp_path / "digits"
    with StoreWriter(str(uri), vocab_size=512, samples_per_shard=8, metadata={"rejected": 1},
                     tokenizer=TokenizerRef(id="msvq-digits", digest="sha256:t0k")) as w:
        for i in range(20):
            w.append(np.arange(16).reshape(4, 4) + i, key=f"digit-{i}", modality="image", condition=i % 10)
    return uri


def test_info_verify_head_and_export_tell_a_user_what_is_in_a_store(store, tmp_path):
    info = arpipe("info", str(store))
    assert info.returncode == 0, info.stderr
    assert "samples    20" in info.stdout and "shards     3" in info.stdout
    assert "msvq-digits" in info.stdout and "512 ids as uint16" in info.stdout and '"rejected": 1' in info.stdout

    as_json = json_output("store info", arpipe("info", str(store), "--json").stdout)
    assert as_json["totals"]["samples"] == as_json["samples"] == 20
    assert as_json["shape_counts"] == [[[4, 4], 20]] and as_json["modality_counts"] == [["image", 20]]

    verify = arpipe("verify", str(store))
    assert verify.returncode == 0 and "verified 3 shards, 20 samples: all checksums match" in verify.stdout

    head = arpipe("head", str(store), "-n", "2")
    assert head.returncode == 0
    assert "[0] key=digit-0 modality=image shape=[4, 4] condition=0 shard=000000" in head.stdout
    assert "tokens: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16" in head.stdout

    out = tmp_path / "wds"
    export = arpipe("export", str(store), "--format", "webdataset", "--out", str(out))
    assert export.returncode == 0 and "wrote 3 tar(s), 20 samples" in export.stdout
    records = list(wds.WebDataset(sorted(str(p) for p in out.glob("*.tar")), shardshuffle=False).decode())
    assert [r["json"]["key"] for r in records] == [f"digit-{i}" for i in range(20)]
    assert np.array_equal(records[5]["npy"], np.arange(16).reshape(4, 4) + 5)


def test_verify_names_the_bad_shard_and_exits_2(store):
    shard = store / "shard-000001.bin"
    data = bytearray(shard.read_bytes())
    data[3] ^= 0x40
    shard.write_bytes(bytes(data))
    result = arpipe("verify", str(store))
    assert result.returncode == 2
    assert "ok  shard-000000" in result.stdout and "BAD shard-000001" in result.stdout
    assert "shard '000001': token checksum mismatch" in result.stdout
    err = result.stderr.strip()
    assert err.count("\n") == 0 and "shard-000001.bin" in err and "Traceback" not in err


def test_a_wrong_uri_is_one_line_with_the_fix(tmp_path, capsys):
    assert main(["store", "info", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {tmp_path / 'nope'}: no manifest.json: not a token store, or its writer never finished; "
                   "check the URI, or rerun the stage that writes this store")


def test_register_adds_the_store_command_to_arpipes_parser(store, capsys):
    parser = argparse.ArgumentParser(prog="arpipe")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["store", "head", str(store), "-n", "1"])
    assert args.command == "store" and args.store_command == "head"
    assert args.func(args) == 0
    assert "key=digit-0" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args(["store", "export", str(store), "--format", "parquet", "--out", "x"])
