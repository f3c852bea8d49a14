"""Writes the bad-input corpus: real files of every kind arpipe reads, broken the ways files break.

    .venv/bin/python tests/data/bad/make_corpus.py      # from the repository root

The files are committed (a few hundred KiB); this script is how each was made, and remakes them
byte for byte (fixed seeds). Good files to mix them with come from ``tests/realdata.py`` at test
time. ``tests/faults/test_bad_inputs.py`` says what each must produce.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import sys
import tarfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def digits(n: int) -> list[np.ndarray]:
    from sklearn.datasets import load_digits

    return [(img * (255 / 16)).astype(np.uint8) for img in load_digits().images[:n]]


def png_bytes(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------ pipelines

GOOD_PIPELINE = """name: bad
storage: ./runs
stages:
  a:
    kind: python
    callable: steps:make
    config: {n: 1}
  b:
    kind: python
    callable: steps:make
    inputs: {x: "${a.out}"}
"""

PIPELINES = {
    "tabs.yaml": GOOD_PIPELINE.replace("    callable: steps:make\n    config", "\tcallable: steps:make\n    config"),
    "duplicate_key.yaml": GOOD_PIPELINE + "  a:\n    kind: python\n    callable: steps:make\n",
    "unknown_kind.yaml": GOOD_PIPELINE.replace("kind: python\n    callable: steps:make\n    config",
                                               "kind: tokenise\n    callable: steps:make\n    config"),
    "bad_reference.yaml": GOOD_PIPELINE.replace("${a.out}", "${nope.store}"),
    "python_tag.yaml": GOOD_PIPELINE.replace("{n: 1}", "!!python/object/apply:os.system ['touch /tmp/arpipe-corpus-pwned']"),
    "python_name_tag.yaml": GOOD_PIPELINE.replace("config: {n: 1}", "config: !!python/name:os.system"),
    "not_a_mapping.yaml": "- name: bad\n- stages: {}\n",
    "empty.yaml": "",
    "unknown_field.yaml": GOOD_PIPELINE.replace("config: {n: 1}", "confg: {n: 1}"),
    "wrong_type.yaml": GOOD_PIPELINE.replace("config: {n: 1}", "config: [1, 2]"),
    "cycle.yaml": GOOD_PIPELINE.replace("config: {n: 1}", "config: {n: 1}\n    needs: [b]"),
    "unset_env.yaml": GOOD_PIPELINE.replace("{n: 1}", "{n: \"${env:ARPIPE_BAD_CORPUS_UNSET}\"}"),
    "bad_callable.yaml": GOOD_PIPELINE.replace("callable: steps:make\n    config", "callable: os.system\n    config"),
    "missing_module.yaml": GOOD_PIPELINE.replace("callable: steps:make\n    config",
                                                 "callable: no_such_module:make\n    config"),
    "train_bad_model.yaml": "name: bad\nstages:\n  train:\n    kind: train\n    data: [{store: ./store}]\n"
                            "    model: {preset: tiny, n_embd: 30, n_head: 4}\n    steps: 10\n",
    # with its sibling ds_config_syntax.json (below): a trailing comma, as hand-edited DeepSpeed configs have
    "train_ds_config_syntax.yaml": "name: bad\nstages:\n  train:\n    kind: train\n    data: [{store: ./store}]\n"
                                   "    deepspeed: {config_file: ds_config_syntax.json}\n    steps: 10\n",
    # a "billion laughs": nine levels of ten aliases, 10^9 values from a dozen lines
    "alias_bomb.yaml": "name: bad\nstages: {}\nbomb:\n  a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 9)),
    "deep_nesting.yaml": "name: bad\nstages:\n  a:\n    kind: python\n    callable: steps:make\n"
                         "    config: {x: " + "[" * 3000 + "]" * 3000 + "}\n",
}


def pipelines() -> None:
    folder = HERE / "pipelines"
    for name, text in PIPELINES.items():
        (folder / name).write_text(text)
    (folder / "not_utf8.yaml").write_bytes("name: caf\u00e9\nstorage: ./runs\n".encode("latin-1") + b"\xff\xfe")
    (folder / "ds_config_syntax.json").write_text('{\n  "zero_optimization": {\n    "stage": 2,\n  }\n}\n')


# --------------------------------------------------------------------------------------- images


def images() -> None:
    import tifffile

    folder = HERE / "images"
    good = png_bytes(digits(1)[0])
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "text.png").write_text("this is a text file with a .png name\n")
    (folder / "empty.png").write_bytes(b"")
    (folder / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    nan = np.full((8, 8), np.nan, dtype=np.float32)
    tifffile.imwrite(folder / "nan.tif", nan)
    # a PNG header claiming 60000 x 60000 pixels (a decompression bomb) on a few bytes
    header = png_bytes(np.zeros((8, 8), np.uint8))
    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 0, 0, 0, 0)
    import zlib

    chunk = b"IHDR" + ihdr
    bomb = header[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + header[33:]
    (folder / "bomb.png").write_bytes(bomb)


# ---------------------------------------------------------------------------------- tar shards


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> None:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data) if data is not None else None)


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _link(name: str, target: str, hard: bool = False) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE if hard else tarfile.SYMTYPE
    info.linkname = target
    return info, None


def tars() -> None:
    folder = HERE / "tars"
    imgs = [png_bytes(a) for a in digits(4)]
    good = [_file("s0.png", imgs[0]), _file("s0.cls", b"0"), _file("s1.png", imgs[1]), _file("s1.cls", b"1")]
    _tar(folder / "traversal.tar", [*good, _file("../../escaped.png", imgs[2])])
    _tar(folder / "absolute.tar", [*good, _file("/tmp/arpipe-absolute.png", imgs[2])])
    _tar(folder / "symlink_out.tar", [*good, _link("s2.png", "/etc/passwd")])
    _tar(folder / "hardlink_out.tar", [*good, _link("s3.png", "../../../etc/shadow", hard=True)])
    _tar(folder / "no_image.tar", [_file("s9.cls", b"9"), _file("s9.txt", b"no picture here")])
    whole = io.BytesIO()
    with tarfile.open(fileobj=whole, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in good:
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    (folder / "truncated.tar").write_bytes(whole.getvalue()[:700])


# --------------------------------------------------------------------------------------- videos


def videos() -> None:
    from realdata import gif_path

    folder = HERE / "videos"
    gif = gif_path().read_bytes()
    (folder / "truncated.gif").write_bytes(gif[: len(gif) // 3])
    (folder / "garbage.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(np.random.default_rng(0).integers(
        0, 256, 4000, dtype=np.uint8)))
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "text.webm").write_text("not a video\n")


# -------------------------------------------------------------------------------------- volumes


def volumes() -> None:
    import mrcfile
    import tifffile

    folder = HERE / "volumes"
    (folder / "empty.mrc").write_bytes(b"")
    good = folder / "good.tmp.mrc"
    with mrcfile.new(str(good), overwrite=True) as mrc:
        mrc.set_data(np.zeros((16, 32, 32), np.float32))
    data = bytearray(good.read_bytes())
    data[208:212] = b"XXXX"              # the 'MAP ' machine stamp
    data[0:12] = struct.pack("<iii", -5, 1 << 30, 7)   # negative / absurd dimensions
    (folder / "bad_header.mrc").write_bytes(bytes(data[:4096]))
    good.unlink()
    tifffile.imwrite(folder / "nan.tif", np.full((16, 32, 32), np.nan, np.float32))
    buf = io.BytesIO()
    np.save(buf, np.zeros((16, 32, 32), np.float32))
    (folder / "truncated.npy").write_bytes(buf.getvalue()[:5000])
    np.save(folder / "flat.npy", np.zeros((32, 32), np.float32))


# --------------------------------------------------------------------------------- point clouds


def clouds() -> None:
    from plyfile import PlyData, PlyElement

    folder = HERE / "clouds"
    rng = np.random.default_rng(0)
    pts = np.array([tuple(p) for p in rng.random((64, 3), dtype=np.float32)],
                   dtype=[("x", "f4"), ("y", "f4"), ("z", "f4")])
    good = io.BytesIO()
    PlyData([PlyElement.describe(pts, "vertex")], text=False).write(good)
    raw = good.getvalue()
    (folder / "wrong_count.ply").write_bytes(raw.replace(b"element vertex 64", b"element vertex 6400"))
    (folder / "text.ply").write_text("not a point cloud\n")
    empty = np.zeros(0, dtype=[("x", "f4"), ("y", "f4"), ("z", "f4")])
    out = io.BytesIO()
    PlyData([PlyElement.describe(empty, "vertex")], text=False).write(out)
    (folder / "empty.ply").write_bytes(out.getvalue())
    nan = rng.random((64, 3)).astype(np.float32)
    nan[5] = np.nan
    np.save(folder / "nan.npy", nan)
    (folder / "garbage.xyz").write_text("0.1 0.2 0.3\nthis line is not numbers\n0.4 0.5\n")


# ------------------------------------------------------------------------------ tokenizer artifacts


def tokenizers() -> None:
    from arpipe.pipeline.digest import digest_json
    from arpipe.stages.modalities import make_tokenizer

    folder = HERE / "tokenizers"
    arrays = [(a / 255.0).astype(np.float32)[None] for a in digits(64)]
    tok = make_tokenizer("msvq", scales=[1, 2, 4], patch=[2, 2], codebook_size=8, input_shape=[1, 8, 8], fit_iters=5,
                         fit_rounds=1, seed=0)
    tok.fit(arrays)
    good = folder / "good.tmp"
    tok.save(str(good))
    doc = json.loads((good / "tokenizer.json").read_text())
    weights = (good / "weights.safetensors").read_bytes()

    def artifact(name: str, config: str | bytes | None, weights_bytes: bytes | None) -> None:
        out = folder / name
        out.mkdir(exist_ok=True)
        if config is not None:
            (out / "tokenizer.json").write_bytes(config if isinstance(config, bytes) else config.encode())
        if weights_bytes is not None:
            (out / "weights.safetensors").write_bytes(weights_bytes)

    def signed(changes: dict) -> str:
        body = {k: v for k, v in {**doc, **changes}.items() if k not in ("digest", "provenance")}
        return json.dumps({**body, "digest": digest_json(body)}, indent=2, sort_keys=True)

    artifact("bad_json", json.dumps(doc)[:-40], weights)
    artifact("json_list", json.dumps([doc["type"], doc["vocab_size"]]), weights)
    artifact("unknown_type", signed({"type": "wavelet"}), weights)
    artifact("future_format", signed({"format": 99}), weights)
    artifact("hand_edited", json.dumps({**doc, "vocab_size": 4096}, indent=2), weights)
    flipped = bytearray(weights)
    flipped[-3] ^= 0xFF
    artifact("corrupt_weights", json.dumps(doc, indent=2), bytes(flipped))
    artifact("missing_weights", json.dumps(doc, indent=2), None)
    shutil.rmtree(good)


# ---------------------------------------------------------------------------------- token stores


def stores() -> None:
    from arpipe.stages.store import StoreWriter

    folder = HERE / "stores"
    good = folder / "good.tmp"
    shutil.rmtree(good, ignore_errors=True)
    with StoreWriter(str(good), vocab_size=16, samples_per_shard=4) as w:
        for i in range(12):
            w.append((np.arange(6) + i) % 16, key=f"s{i}.png", modality="image", condition=i % 3)

    def copy(name: str) -> Path:
        out = folder / name
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(good, out)
        return out

    shard = copy("bad_checksum") / "shard-000001.bin"
    data = bytearray(shard.read_bytes())
    data[3] ^= 0x0F
    shard.write_bytes(bytes(data))
    (copy("no_manifest") / "manifest.json").unlink()
    (copy("manifest_not_json") / "manifest.json").write_text('{"format_version": 1, "shards": [')
    shard = copy("truncated_shard") / "shard-000002.bin"
    shard.write_bytes(shard.read_bytes()[:-5])
    (copy("missing_index") / "shard-000000.idx.arrow").unlink()
    manifest = copy("wrong_vocab") / "manifest.json"
    m = json.loads(manifest.read_text())
    m["vocab"]["vocab_size"] = 4      # tokens go up to 15: a hand-edited vocabulary
    manifest.write_text(json.dumps(m, indent=1))
    shutil.rmtree(good)


# -------------------------------------------------------------------------------- model checkpoints


def models() -> None:
    import torch

    from arpipe.stages.models import Transformer, VocabLayout, preset, save_model

    folder = HERE / "models"
    torch.manual_seed(0)
    good = folder / "good.tmp"
    vocab = VocabLayout.build([("image", 8)], classes=["0", "1"])
    config = preset("tiny", vocab_size=vocab.vocab_size, n_layer=1, n_embd=16, n_head=2, max_seq_len=8,
                    paradigm="next_scale")
    save_model(good, Transformer(config), vocab=vocab)
    layout = {"axes": ["scale", "y", "x"], "boundaries": [0, 1, 5], "grid": [2, 2], "patch": [4, 4],
              "scales": [[1, 1], [2, 2]], "order": "coarse to fine; row-major within a scale"}
    (good / "tokenizers.json").write_text(json.dumps({"image": {
        "modality": "image", "tokenizer_uri": "./tokenizer", "tokenizer_digest": None, "layout": layout,
        "store": "./store", "classes": ["0", "1"]}}, indent=1, sort_keys=True))

    def copy(name: str) -> Path:
        out = folder / name
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(good, out)
        return out

    weights = copy("corrupt_safetensors") / "model.safetensors"
    weights.write_bytes(b"\xff" * 8 + weights.read_bytes()[8:])       # header length now absurd
    weights = copy("truncated_safetensors") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    config = copy("config_format") / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "format": 7}))
    (copy("config_not_json") / "config.json").write_text("{format: 1, model_args: ")
    pickled = copy("pickle_weights")
    (pickled / "model.safetensors").unlink()
    (pickled / "model.pt").write_bytes(b"cos\nsystem\n(S'touch /tmp/arpipe-corpus-pwned'\ntR.")   # os.system(...)
    shutil.rmtree(good)


def main() -> None:
    for part in (pipelines, images, tars, videos, volumes, clouds, tokenizers, stores, models):
        (HERE / part.__name__).mkdir(exist_ok=True)
        part()
    total = sum(p.stat().st_size for p in HERE.rglob("*") if p.is_file())
    print(f"wrote the corpus under {HERE}: {total / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
