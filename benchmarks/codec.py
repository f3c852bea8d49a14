"""Codec tokens (JPEG-LM) against msvq on the same images, side by side in one run (issue 21).

Measures, on 1000 of scikit-learn's digits upsampled to 32x32 (8-bit gray, as tests/realdata.py saves them):

- throughput: ``encode_arrays`` of the 1000 images in-process, images per second, best of ``--repeats``,
  for the ``codec`` tokenizer (Pillow JPEG, quality 25) and ``msvq`` (scales 1, 2, 4, 8; 512 codes, fitted
  here on the same digits first); decode throughput too;
- sequence length per image: the codec's mean (and min/max, and the part that is the constant JFIF header)
  against msvq's fixed count;
- for context: the 24-frame GIF of scikit-image as one H.264 clip (tokens, encode time).

Both run on one thread (``torch.set_num_threads(1)``; Pillow's encoder is single-threaded). The ratio
lines come last; everything is also written to ``benchmarks/results/codec.json``.

    .venv/bin/python benchmarks/codec.py [--images 1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from arpipe.stages.modalities import CodecTokenizer, MultiScaleVQ, VideoReader, psnr  # noqa: E402

SIZE = 32


def digits(count: int) -> list[np.ndarray]:
    """``count`` digits as ``x_CHW`` floats of 8-bit 32x32 pictures (bicubic upsampling, as users save them)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    images = load_digits().images
    images = images[np.arange(count) % len(images)]
    return [np.asarray(Image.fromarray((d * (255 / 16)).astype(np.uint8)).resize((SIZE, SIZE), Image.BICUBIC),
                       dtype=np.float32)[None] / 255.0 for d in images]


def gif_clip() -> np.ndarray:
    """scikit-image's 24-frame GIF as one ``x_CTHW`` clip, read by the project's video reader."""
    import skimage

    [clip] = list(VideoReader(str(Path(skimage.__file__).parent / "data" / "no_time_for_that_tiny.gif"), clip_len=24))
    return clip.data


def best_rate(fn, n: int, repeats: int) -> tuple[float, float]:
    """(items per second, seconds) of the fastest of ``repeats`` calls of ``fn`` on ``n`` items."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return n / min(seconds), min(seconds)


def header_tokens(idx_L: np.ndarray) -> int:
    """Tokens before the entropy-coded scan: up to the end of the start-of-scan segment."""
    data = idx_L[:-1].astype(np.uint8).tobytes()
    sos = data.find(b"\xff\xda")
    return sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big")


def measure(name: str, tok, images: list[np.ndarray], repeats: int) -> dict:
    tokens = tok.encode_arrays(images)
    encode_rate, encode_s = best_rate(lambda: tok.encode_arrays(images), len(images), repeats)
    decode_rate, _ = best_rate(lambda: tok.decode_arrays(tokens), len(images), repeats)
    lengths = np.array([len(t) for t in tokens])
    decoded = torch.from_numpy(np.stack(tok.decode_arrays(tokens)))
    row = {"tokenizer": name, "images": len(images), "encode_images_per_s": encode_rate, "encode_seconds": encode_s,
           "decode_images_per_s": decode_rate, "tokens_per_image_mean": float(lengths.mean()),
           "tokens_per_image_min": int(lengths.min()), "tokens_per_image_max": int(lengths.max()),
           "vocab": tok.vocab_size,
           "psnr_db": float(psnr(torch.from_numpy(np.stack(images)), decoded.clamp(0, 1)).mean())}
    if name.startswith("codec"):
        row["header_tokens"] = float(np.mean([header_tokens(t) for t in tokens]))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    images = digits(args.images)

    start = time.perf_counter()
    msvq = MultiScaleVQ(input_shape=[1, SIZE, SIZE], scales=[1, 2, 4, 8], patch=[4, 4], codebook_size=512,
                        fit_iters=50).fit(images)
    msvq_fit_s = time.perf_counter() - start
    rows = [measure("codec (jpeg q25)", CodecTokenizer(input_shape=[1, SIZE, SIZE], quality=25), images, args.repeats),
            measure("codec (jpeg q75)", CodecTokenizer(input_shape=[1, SIZE, SIZE], quality=75), images, args.repeats),
            measure("msvq (1,2,4,8; 512 codes)", msvq, images, args.repeats)]
    rows[-1]["fit_seconds"] = msvq_fit_s

    clip = gif_clip()
    video = CodecTokenizer(modality="video", input_shape=list(clip.shape))
    rate, seconds = best_rate(lambda: video.encode_one(clip), 1, args.repeats)
    gif = {"clip": "skimage no_time_for_that_tiny.gif, 24 frames 25x14 RGB", "crf": video.crf,
           "tokens": len(video.encode_one(clip)), "encode_seconds": seconds,
           "tokens_per_frame": len(video.encode_one(clip)) / clip.shape[1]}

    codec, codec75, vq = rows
    ratios = {
        "codec_q25_over_msvq_encode_images_per_s": codec["encode_images_per_s"] / vq["encode_images_per_s"],
        "codec_q25_over_msvq_decode_images_per_s": codec["decode_images_per_s"] / vq["decode_images_per_s"],
        "codec_q25_over_msvq_tokens_per_image": codec["tokens_per_image_mean"] / vq["tokens_per_image_mean"],
        "codec_q75_over_msvq_tokens_per_image": codec75["tokens_per_image_mean"] / vq["tokens_per_image_mean"],
        "codec_q25_header_share": codec["header_tokens"] / codec["tokens_per_image_mean"],
    }
    out = ROOT / "benchmarks" / "results"
    out.mkdir(exist_ok=True)
    (out / "codec.json").write_text(json.dumps({"images": f"{args.images} sklearn digits, 32x32 gray, 1 thread",
                                                "rows": rows, "gif": gif, "ratios": ratios}, indent=1))

    print(f"\n{args.images} digits at 32x32 (1 thread), best of {args.repeats}:")
    print(f"{'tokenizer':<27} {'encode img/s':>12} {'decode img/s':>12} {'tokens/img':>10} {'min-max':>9} "
          f"{'vocab':>5} {'PSNR dB':>7}")
    for r in rows:
        span = f"{r['tokens_per_image_min']}-{r['tokens_per_image_max']}"
        print(f"{r['tokenizer']:<27} {r['encode_images_per_s']:>12.0f} {r['decode_images_per_s']:>12.0f} "
              f"{r['tokens_per_image_mean']:>10.1f} {span:>9} {r['vocab']:>5} {r['psnr_db']:>7.2f}")
    print(f"codec q25: {codec['header_tokens']:.0f} of its {codec['tokens_per_image_mean']:.0f} tokens are the "
          f"JFIF header (the same for every image); msvq fit: {msvq_fit_s:.1f} s, codec: none")
    print(f"GIF clip as H.264 (crf {gif['crf']}): {gif['tokens']} tokens ({gif['tokens_per_frame']:.1f} per frame), "
          f"encoded in {gif['encode_seconds'] * 1000:.1f} ms")
    print("\nratios:")
    for name, value in ratios.items():
        print(f"  {name}: {value:.2f}")


if __name__ == "__main__":
    main()
