"""JPEG-LM's codec tokens (issue 21): an image is the bytes of its JPEG file, a clip the bytes of its H.264 stream.

Real digits round-trip byte for byte, the GIF video decodes back frame for frame, sequences that do not
decode fail with the codec's words, and a store of JPEG tokens trains with packing and samples through
`arpipe run` into files Pillow opens (or quarantined rejects with the codec's message).
"""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch
from helpers import arpipe, committed_output, stage_lines, write
from realdata import digits_folder, gif_path

from arpipe.stages.modalities import (
    CodecTokenizer,
    TokenizerError,
    VideoReader,
    load_tokenizer,
    make_tokenizer,
    psnr,
)
from arpipe.stages.modalities.codec import END, nal_units

SIZE = 32


@pytest.fixture(scope="module")
def digits_u8() -> np.ndarray:
    """200 of scikit-learn's digits as 8-bit 32x32 pictures (bicubic, as tests/realdata.py saves them)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    images = load_digits().images[:200]
    return np.stack([np.asarray(Image.fromarray((d * (255 / 16)).astype(np.uint8)).resize((SIZE, SIZE), Image.BICUBIC))
                     for d in images])


def pillow_jpeg(pixels_HW: np.ndarray, quality: int, subsampling: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels_HW).save(buf, format="JPEG", quality=quality, subsampling=subsampling)
    return buf.getvalue()


def as_samples(pixels_NHW: np.ndarray) -> list[np.ndarray]:
    return [(p[None] / 255.0).astype(np.float32) for p in pixels_NHW]


@pytest.fixture(scope="module")
def gif_clip():
    [clip] = list(VideoReader(str(gif_path()), clip_len=24))   # all 24 frames, 25 x 14 RGB
    return clip


# ------------------------------------------------------------------ images


def test_digits_round_trip_byte_exact_through_pillow(digits_u8):
    from PIL import Image

    tok = make_tokenizer("codec", modality="image", input_shape=[1, SIZE, SIZE], quality=50)
    samples = as_samples(digits_u8)
    tokens = tok.encode_arrays(samples)
    for pixels, idx in zip(digits_u8, tokens):
        assert idx[-1] == END and (idx[:-1] < 256).all() and idx.dtype == np.int64
        file = idx[:-1].astype(np.uint8).tobytes()
        assert file == pillow_jpeg(pixels, 50, "4:2:0")   # the tokens are the very file Pillow writes
        with Image.open(io.BytesIO(file)) as image:
            assert (image.format, image.size, image.mode) == ("JPEG", (SIZE, SIZE), "L")
            assert not image.info.get("exif") and not image.info.get("icc_profile")
    decoded = tok.decode_arrays(tokens)
    assert all(d.shape == (1, SIZE, SIZE) and d.dtype == np.float32 and 0 <= d.min() <= d.max() <= 1 for d in decoded)
    db = psnr(torch.from_numpy(np.stack(samples)), torch.from_numpy(np.stack(decoded)))
    assert float(db.min()) > 24 and float(db.mean()) > 28, db   # quality 50 on 32x32 digits: about 33 dB


def test_one_length_per_sample_and_the_vocabulary(digits_u8):
    tok = CodecTokenizer(input_shape=[1, SIZE, SIZE])
    lengths = [len(t) for t in tok.encode_arrays(as_samples(digits_u8[:50]))]
    assert len(set(lengths)) > 10 and min(lengths) > 300   # the ~330-byte JFIF header, then the scan
    assert tok.vocab_size == 257 and tok.tokens_per_sample is None and tok.code_embeddings() is None
    assert tok.layout()["variable_length"] and tok.layout()["end_id"] == END
    assert tok.positions(np.zeros(7)).tolist() == [[k] for k in range(7)]


def test_encoding_is_deterministic_and_the_artifact_records_the_settings(digits_u8, tmp_path):
    samples = as_samples(digits_u8[:20])
    tok = make_tokenizer("codec", modality="image", input_shape=[1, SIZE, SIZE], quality=30, subsampling="4:4:4")
    first = tok.encode_arrays(samples)
    assert tok.fit(samples) is tok   # nothing to learn
    again = CodecTokenizer(input_shape=[1, SIZE, SIZE], quality=30, subsampling="4:4:4").encode_arrays(samples)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    digest = tok.save(str(tmp_path / "tok"))
    loaded = load_tokenizer(str(tmp_path / "tok"))
    assert isinstance(loaded, CodecTokenizer) and loaded.digest == digest
    assert all(np.array_equal(a, b) for a, b in zip(first, loaded.encode_arrays(samples)))
    settings = loaded.fit_info["settings"]
    assert settings["codec"] == "jpeg" and settings["quality"] == 30 and settings["subsampling"] == "4:4:4"
    assert settings["optimize"] is False and loaded.fit_info["settings_digest"].startswith("sha256:")
    assert CodecTokenizer(input_shape=[1, SIZE, SIZE], quality=31).digest != digest


def test_rgb_images_keep_their_subsampling():
    from skimage import data
    from skimage.transform import resize

    x_CHW = resize(data.astronaut(), (48, 40), anti_aliasing=True).astype(np.float32).transpose(2, 0, 1)
    sizes = {}
    for subsampling in ("4:4:4", "4:2:0"):
        tok = CodecTokenizer(input_shape=[3, 48, 40], subsampling=subsampling)
        idx = tok.encode_one(x_CHW)
        pixels = (np.clip(x_CHW, 0, 1) * 255 + 0.5).astype(np.uint8).transpose(1, 2, 0)
        assert idx[:-1].astype(np.uint8).tobytes() == pillow_jpeg(pixels, 25, subsampling)
        assert tok.decode_one(idx).shape == (3, 48, 40)
        sizes[subsampling] = len(idx)
    assert sizes["4:2:0"] < sizes["4:4:4"]


def test_sequences_that_do_not_decode_fail_with_the_codecs_message(digits_u8):
    tok = CodecTokenizer(input_shape=[1, SIZE, SIZE])
    idx = tok.encode_one(as_samples(digits_u8[:1])[0])
    truncated = np.r_[idx[:len(idx) // 2], END]
    with pytest.raises(TokenizerError, match=r"JPEG file of \d+ bytes does not decode: .*(truncated|Truncated)"):
        tok.decode_one(truncated)
    garbled = idx.copy()
    garbled[:4] = 0   # no start-of-image marker
    with pytest.raises(TokenizerError, match=r"JPEG file of \d+ bytes does not decode: Pillow finds no JPEG header"):
        tok.decode_one(garbled)
    scan = bytes(idx[:-1].astype(np.uint8)).find(b"\xff\xda") + 10   # past the start-of-scan header
    noise = idx.copy()
    noise[scan:-1] = np.random.default_rng(0).integers(0, 256, len(idx) - 1 - scan)
    with pytest.raises(TokenizerError, match=r"JPEG file of \d+ bytes does not decode: "):
        tok.decode_one(noise)
    other = CodecTokenizer(input_shape=[1, 16, 16])
    with pytest.raises(TokenizerError, match=r"JPEG file of \d+ bytes is 32x32, the tokenizer's size is 16x16"):
        other.decode_one(idx)


def test_a_sequence_without_an_end_is_one_clear_line(digits_u8):
    tok = CodecTokenizer(input_shape=[1, SIZE, SIZE])
    idx = tok.encode_one(as_samples(digits_u8[:1])[0])
    with pytest.raises(TokenizerError) as err:
        tok.decode_one(idx[:-1])
    line = str(err.value)
    assert "\n" not in line and line == (f"codec sequence of {len(idx) - 1} tokens has no end token (256): the jpeg "
                                         "file never ends; sample more tokens (raise `length`)")
    with pytest.raises(TokenizerError, match="no end token"):
        tok.trim(idx[:-1])
    padded = np.r_[idx, [7, 8, 256, 9]]   # a sampler runs on past the end: trim keeps the first file
    assert np.array_equal(tok.trim(padded), idx)
    with pytest.raises(TokenizerError, match="4 tokens past its end token"):
        tok.decode_one(padded)


def test_bad_samples_and_settings_are_refused():
    tok = CodecTokenizer(input_shape=[1, SIZE, SIZE])
    with pytest.raises(TokenizerError, match=r"expects image samples of shape \(1, 32, 32\), got \(1, 16, 16\)"):
        tok.encode_one(np.zeros((1, 16, 16), np.float32))
    with pytest.raises(TokenizerError, match="codec tokenizes images .JPEG. and video .H.264., not volume"):
        CodecTokenizer(modality="volume")
    with pytest.raises(TokenizerError, match="codec quality 101 is out of range; use a JPEG quality from 1 to 100"):
        CodecTokenizer(quality=101)


def test_a_codec_setting_out_of_range_fails_validate_in_one_line(tmp_path):
    write(tmp_path, {"bad.yaml": """
        name: bad
        stages:
          tok:
            kind: tokenizer
            source: {modality: image, uri: ./data}
            tokenizer: {type: codec, quality: 0}
        """})
    run = arpipe("validate", "bad.yaml", cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr.strip() == ("arpipe: error: bad.yaml:6:39: stages.tok.tokenizer.quality: input should be greater "
                                  "than or equal to 1, got 0; see `arpipe schema` for the expected shape")


# ------------------------------------------------------------------- video


def test_the_gif_becomes_an_h264_stream_pyav_decodes_frame_for_frame(gif_clip):
    import av

    x_CTHW = gif_clip.data
    assert x_CTHW.shape == (3, 24, 25, 14)
    tok = make_tokenizer("codec", modality="video", input_shape=list(x_CTHW.shape), crf=23)
    idx = tok.encode_one(x_CTHW)
    assert idx[-1] == END and (idx[:-1] < 256).all()
    stream = idx[:-1].astype(np.uint8).tobytes()
    assert np.array_equal(tok.encode_one(x_CTHW), idx)   # deterministic
    assert all(unit[unit.index(b"\x00\x00\x01") + 3] & 0x1F != 6 for unit in nal_units(stream))   # no SEI
    with av.open(io.BytesIO(stream), format="h264") as container:   # the bytes alone, as a user's tool reads them
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 24 and frames[0].shape == (26, 14, 3)   # an odd side is padded for yuv420p
    decoded = tok.decode_one(idx)
    assert decoded.shape == x_CTHW.shape and decoded.dtype == np.float32
    frames_BCHW = torch.from_numpy(np.ascontiguousarray(x_CTHW.transpose(1, 0, 2, 3)))
    db = psnr(frames_BCHW, torch.from_numpy(np.ascontiguousarray(decoded.transpose(1, 0, 2, 3))))
    assert float(db.mean()) > 25, db
    assert tok.fit_info["settings"]["bframes"] == 0 and tok.fit_info["settings"]["threads"] == 1


def test_a_broken_h264_stream_fails_with_the_codecs_message(gif_clip):
    tok = CodecTokenizer(modality="video", input_shape=list(gif_clip.data.shape))
    idx = tok.encode_one(gif_clip.data)
    with pytest.raises(TokenizerError, match=r"H.264 stream of \d+ bytes decodes to \d+ frames, the tokenizer's "
                                             r"clips have 24"):
        tok.decode_one(np.r_[idx[:len(idx) // 2], END])
    with pytest.raises(TokenizerError, match=r"H.264 stream of \d+ bytes does not decode: Invalid data found"):
        tok.decode_one(np.r_[idx[:30], END])
    gray = CodecTokenizer(modality="video", input_shape=[1, 24, 25, 14])
    x = gif_clip.data.mean(0, keepdims=True)
    assert gray.decode_one(gray.encode_one(x)).shape == (1, 24, 25, 14)


# ------------------------------------------------------------ the pipeline

PIPELINE = """
name: jpeg-lm
storage: ./runs
stages:
  tok:
    kind: tokenizer
    source: {modality: image, uri: ./data/digits, channels: 1, size: 32}
    tokenizer: {type: codec, quality: 25}
    fit: {max_samples: 4, heldout: 2}
  jpegs:
    kind: tokenize
    source: {modality: image, uri: ./data/digits, channels: 1, size: 32}
    tokenizer: ${tok.tokenizer}
    workers: 1
  tok_video:
    kind: tokenizer
    source: {modality: video, uri: ./data/video, clip_len: 8}
    tokenizer: {type: codec, crf: 28, gop: 8}
    fit: {max_samples: 2, heldout: 1}
  clips:
    kind: tokenize
    source: {modality: video, uri: ./data/video, clip_len: 8}
    tokenizer: ${tok_video.tokenizer}
    workers: 1
  train:
    kind: train
    data: [{store: "${jpegs.store}"}]
    model: {preset: tiny, paradigm: next_token, n_layer: 2, n_embd: 64, n_head: 2}
    optimizer: {lr: 0.01, warmup_steps: 2}
    packing: true
    seq_len: 512
    workers: 1
    global_batch: 4
    steps: 120
  sample:
    kind: sample
    model: ${train.model}
    num_samples: 4
    length: 480
    temperature: 0
    batch_size: 4
"""


def test_jpeg_tokens_store_train_with_packing_and_sample_into_files_pillow_opens(tmp_path, ray_cluster):
    """20 digits memorized by a tiny model: its greedy samples are JPEG files Pillow opens (their scans partly
    garbled), or quarantined with the codec's reason (a file cut short, say)."""
    import shutil

    import pyarrow as pa
    from PIL import Image

    from arpipe.stages.store import TokenStore

    digits_folder(tmp_path / "data" / "digits", count=20, size=SIZE)
    (tmp_path / "data" / "video").mkdir(parents=True)
    shutil.copy(gif_path(), tmp_path / "data" / "video" / "tiny.gif")
    write(tmp_path, {"jpeg.yaml": PIPELINE})
    run = arpipe("run", "jpeg.yaml", cwd=tmp_path, env={"RAY_ADDRESS": ray_cluster}, timeout=600, check=True)
    assert {stage: s[-1] for stage, s in stage_lines(run.stdout).items()} == dict.fromkeys(
        ("tok", "jpegs", "tok_video", "clips", "train", "sample"), "done")

    tok = load_tokenizer(str(committed_output(tmp_path, "tok") / "tokenizer"))
    assert tok.fit_info["settings"]["quality"] == 25
    store = TokenStore.open(str(committed_output(tmp_path, "jpegs") / "store"))
    lengths = store.lengths()
    assert len(store) == 20 and len(set(lengths.tolist())) > 5 and store.manifest.vocab.vocab_size == 257
    for sample, length in zip(store, lengths):
        assert sample.tokens.shape == (length,) and sample.tokens[-1] == END
        with Image.open(io.BytesIO(sample.tokens[:-1].astype(np.uint8).tobytes())) as image:
            assert image.format == "JPEG"
    clips = TokenStore.open(str(committed_output(tmp_path, "clips") / "store"))
    assert len(clips) == 3 and all(s.tokens[-1] == END for s in clips)   # 24 frames: 3 clips of 8
    video = load_tokenizer(str(committed_output(tmp_path, "tok_video") / "tokenizer"))
    assert all(video.decode_one(s.tokens).shape == (3, 8, 25, 14) for s in clips)

    out = committed_output(tmp_path, "sample")
    samples = TokenStore.open(str(out / "samples"))
    rejects = pa.ipc.open_file(str(out / "rejects.arrow")).read_all().to_pylist()
    assert len(samples) + len(rejects) == 4 and len(samples) >= 1
    codec_says = r"tokens do not decode: (JPEG file of \d+ bytes (does not decode|is)|codec sequence of 480 tokens has no end)"
    assert all(re.match(codec_says, r["reason"]) and "\n" not in r["reason"] for r in rejects), rejects
    for sample in samples:
        idx = sample.tokens.reshape(-1)
        assert idx[-1] == END and (idx[:-1] < 256).all()
        with Image.open(io.BytesIO(idx[:-1].astype(np.uint8).tobytes())) as image:
            image.load()
            assert (image.format, image.size) == ("JPEG", (SIZE, SIZE))
    assert len(list((out / "media" / "image").glob("*.png"))) == len(samples)
