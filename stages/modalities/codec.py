"""codec: an image as the bytes of its JPEG file, a video clip as its H.264 bitstream (JPEG-LM).

Following JPEG-LM (Han et al., 2024), the tokens of a sample are the bytes a
standard codec writes, one token per byte (ids 0..255), then one end token
(:data:`END`, id 256): vocabulary 257. The sequence length varies per sample
and the end token is how a sampled sequence says where its file stops.

- Images (``x_CHW`` in [0, 1], C = 1 or 3) are saved by Pillow as baseline
  JPEG with the configured ``quality`` and ``subsampling``, ``optimize`` and
  ``progressive`` off, no EXIF, ICC profile or other metadata: the tokens are
  exactly the file Pillow writes, and a given image always gives the same bytes.
- Video clips (``x_CTHW``) are encoded by libx264 through PyAV with fixed
  settings (``preset``, ``crf``, keyframe interval ``gop``, yuv420p, no
  B-frames, one thread so the stream does not depend on the machine's core
  count) into a raw Annex-B stream, without the SEI messages (x264 writes its
  version and options there, some 600 bytes nothing needs to decode). Odd
  sides are padded by repeating the edge and cropped again on decoding.

Nothing is fitted: the artifact records the codec settings, their digest and
the encoder libraries. Decoding a sequence decodes the file; one that does
not decode (the paper reports this for a share of samples) raises
:class:`TokenizerError` with the codec's message, which the sample stage
quarantines.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from arpipe.pipeline.digest import digest_json

from .base import Tokenizer, TokenizerError

#: the end token: the id after the 256 byte values
END = 256
SUBSAMPLINGS = ("4:4:4", "4:2:2", "4:2:0")
PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")
#: frame rate written into the H.264 stream (timing only: frames are decoded in order, whatever the rate)
FRAME_RATE = 8
_SEI = 6   # H.264 NAL unit type of supplemental enhancement information


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8, rounded (as the media files and previews round)."""
    return (np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def nal_units(stream: bytes) -> list[bytes]:
    """The NAL units of an Annex-B stream, each with the start code (``00 00 01`` or ``00 00 00 01``) before it."""
    starts, i = [], stream.find(b"\x00\x00\x01")
    while i >= 0:
        starts.append(i - 1 if i > 0 and stream[i - 1] == 0 else i)
        i = stream.find(b"\x00\x00\x01", i + 3)
    return [stream[a:b] for a, b in zip(starts, starts[1:] + [len(stream)])]


def without_sei(stream: bytes) -> bytes:
    """An Annex-B stream without its SEI units (a decoder needs none of them to decode the pictures)."""
    kept = []
    for unit in nal_units(stream):
        header = unit[unit.index(b"\x00\x00\x01") + 3:][:1]
        if not header or header[0] & 0x1F != _SEI:
            kept.append(unit)
    return b"".join(kept)


class CodecTokenizer(Tokenizer):
    """JPEG file bytes (images) or H.264 bitstream bytes (video) as tokens, then :data:`END`; nothing learned."""

    type = "codec"
    learned = False

    def __init__(self, *, modality: str = "image", input_shape: Sequence[int] | None = None, quality: int = 25,
                 subsampling: str = "4:2:0", crf: int = 28, preset: str = "medium", gop: int = 16):
        if modality not in ("image", "video"):
            raise TokenizerError(f"codec tokenizes images (JPEG) and video (H.264), not {modality}",
                                 fix="use msvq or vqvae for volumes, octree for point clouds")
        if not 1 <= int(quality) <= 100:
            raise TokenizerError(f"codec quality {quality} is out of range", fix="use a JPEG quality from 1 to 100")
        if subsampling not in SUBSAMPLINGS:
            raise TokenizerError(f"codec subsampling {subsampling!r} is unknown",
                                 fix=f"use one of {', '.join(SUBSAMPLINGS)}")
        if not 0 <= int(crf) <= 51:
            raise TokenizerError(f"codec crf {crf} is out of range", fix="use an H.264 crf from 0 to 51")
        if preset not in PRESETS:
            raise TokenizerError(f"codec preset {preset!r} is unknown", fix=f"use one of {', '.join(PRESETS)}")
        if int(gop) < 1:
            raise TokenizerError(f"codec gop {gop} is below 1", fix="use a keyframe interval of 1 or more frames")
        rank = 3 if modality == "image" else 4
        if input_shape is not None and (len(input_shape) != rank or int(input_shape[0]) not in (1, 3)):
            layout = "(C, H, W)" if modality == "image" else "(C, T, H, W)"
            raise TokenizerError(f"codec {modality} input_shape must be {layout} with 1 or 3 channels, got "
                                 f"{list(input_shape)}", fix="set the reader's channels: 1 or 3")
        self.modality = modality
        self.input_shape = None if input_shape is None else tuple(int(n) for n in input_shape)
        self.quality, self.subsampling = int(quality), subsampling
        self.crf, self.preset, self.gop = int(crf), preset, int(gop)
        self.fit_info: dict[str, Any] = self.settings_record()

    # ------------------------------------------------------------ properties

    @property
    def codec(self) -> str:
        return "jpeg" if self.modality == "image" else "h264"

    @property
    def vocab_size(self) -> int:
        return 257   # byte values 0..255, then END

    @property
    def tokens_per_sample(self) -> None:
        return None

    def config(self) -> dict[str, Any]:
        return {"modality": self.modality, "input_shape": None if self.input_shape is None else list(self.input_shape),
                "quality": self.quality, "subsampling": self.subsampling, "crf": self.crf, "preset": self.preset,
                "gop": self.gop}

    def settings(self) -> dict[str, Any]:
        """Everything the bytes depend on besides the pixels: what a store of these tokens was written with."""
        if self.codec == "jpeg":
            return {"codec": "jpeg", "writer": "Pillow", "quality": self.quality, "subsampling": self.subsampling,
                    "optimize": False, "progressive": False, "metadata": "none (JFIF header only)"}
        return {"codec": "h264", "encoder": "libx264", "container": "annex-b, SEI removed", "preset": self.preset,
                "crf": self.crf, "gop": self.gop, "bframes": 0, "pix_fmt": "yuv420p", "threads": 1,
                "frame_rate": FRAME_RATE}

    def settings_record(self) -> dict[str, Any]:
        """``fit_info``: the settings, their digest, and the encoder library versions (the bytes depend on them)."""
        settings = self.settings()
        return {"settings": settings, "settings_digest": digest_json(settings),
                "libraries": _library_versions(self.codec)}

    def layout(self) -> dict[str, Any]:
        return {"axes": ["t"], "variable_length": True, "codec": self.codec, "end_id": END,
                "order": f"the {self.codec} file's bytes in order, then the end token"}

    def positions(self, idx_L: torch.Tensor | np.ndarray | None = None) -> torch.Tensor:
        n = 0 if idx_L is None else int(idx_L.numel() if isinstance(idx_L, torch.Tensor) else np.asarray(idx_L).size)
        return torch.arange(n, dtype=torch.int64)[:, None]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        return None

    # --------------------------------------------------------------- encode

    def _check_shape(self, x: np.ndarray) -> None:
        rank = 3 if self.modality == "image" else 4
        expected = self.input_shape
        if x.ndim != rank or x.shape[0] not in (1, 3) or (expected is not None and tuple(x.shape) != expected):
            want = expected or ("(C, H, W)" if rank == 3 else "(C, T, H, W)") + " with C = 1 or 3"
            raise TokenizerError(f"codec tokenizer expects {self.modality} samples of shape {want}, got "
                                 f"{tuple(x.shape)}", fix="set the reader's size (and channels) to match the "
                                                          "tokenizer's input_shape")

    def file_bytes(self, x: np.ndarray) -> bytes:
        """The JPEG file of ``x_CHW`` or the H.264 stream of ``x_CTHW``: what :meth:`encode_one` tokenizes."""
        x = np.asarray(x)
        self._check_shape(x)
        return self._jpeg(x) if self.codec == "jpeg" else self._h264(x)

    def _jpeg(self, x_CHW: np.ndarray) -> bytes:
        from PIL import Image

        pixels = _to_uint8(x_CHW)
        image = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else np.ascontiguousarray(pixels.transpose(1, 2, 0)))
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=self.quality, subsampling=self.subsampling, optimize=False,
                   progressive=False)
        return buf.getvalue()

    def _h264(self, x_CTHW: np.ndarray) -> bytes:
        import av

        pixels = _to_uint8(x_CTHW)
        c, _t, h, w = pixels.shape
        buf = io.BytesIO()
        with av.open(buf, mode="w", format="h264") as container:
            stream = container.add_stream("libx264", rate=FRAME_RATE)
            stream.width, stream.height, stream.pix_fmt = w + w % 2, h + h % 2, "yuv420p"
            stream.thread_count = 1
            stream.options = {"preset": self.preset, "crf": str(self.crf), "g": str(self.gop), "bf": "0",
                              "threads": "1"}
            for frame in pixels.transpose(1, 2, 3, 0):   # x_THWC
                padded = np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
                picture = (av.VideoFrame.from_ndarray(np.ascontiguousarray(padded[..., 0]), format="gray") if c == 1
                           else av.VideoFrame.from_ndarray(np.ascontiguousarray(padded), format="rgb24"))
                for packet in stream.encode(picture):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        return without_sei(buf.getvalue())

    def encode_one(self, x: np.ndarray) -> np.ndarray:
        """``x_CHW`` or ``x_CTHW`` -> ``idx_L`` int64: the file's bytes, then :data:`END`."""
        data = np.frombuffer(self.file_bytes(x), dtype=np.uint8).astype(np.int64)
        return np.concatenate([data, np.array([END], dtype=np.int64)])

    # --------------------------------------------------------------- decode

    def trim(self, idx_L: np.ndarray) -> np.ndarray:
        """The sequence up to and including its first end token (a sampler emits a fixed length).

        Raises :class:`TokenizerError` when there is no end token or a token is not a byte value.
        """
        idx = np.asarray(idx_L, dtype=np.int64).reshape(-1)
        ends = np.flatnonzero(idx == END)
        if not ends.size:
            raise TokenizerError(f"codec sequence of {idx.size} tokens has no end token ({END}): the {self.codec} "
                                 "file never ends", fix="sample more tokens (raise `length`)")
        idx = idx[:ends[0] + 1]
        if idx.min() < 0 or idx.max() > END:
            bad = int(idx.min() if idx.min() < 0 else idx.max())
            raise TokenizerError(f"codec token {bad} is not a byte value in [0, 255] or the end token {END}",
                                 fix="pass token sequences produced by this tokenizer")
        return idx

    def file_of(self, idx_L: np.ndarray) -> bytes:
        """The file a token sequence holds: its bytes before the end token, which must be its last token."""
        idx = np.asarray(idx_L, dtype=np.int64).reshape(-1)
        trimmed = self.trim(idx)
        if trimmed.size != idx.size:
            raise TokenizerError(f"codec sequence has {idx.size - trimmed.size} tokens past its end token",
                                 fix="cut the sequence after its first end token (trim)")
        return trimmed[:-1].astype(np.uint8).tobytes()

    def decode_one(self, idx_L: np.ndarray) -> np.ndarray:
        """``idx_L`` -> ``x_CHW`` (image) or ``x_CTHW`` (video) float32 in [0, 1], the decoded file."""
        data = self.file_of(idx_L)
        if self.input_shape is None:
            raise TokenizerError("codec tokenizer has no input_shape to decode to",
                                 fix="set input_shape, or fit it in a tokenizer stage (which records it)")
        return self._decode_jpeg(data) if self.codec == "jpeg" else self._decode_h264(data)

    def _decode_jpeg(self, data: bytes) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        c, h, w = self.input_shape
        try:
            image = Image.open(io.BytesIO(data), formats=["JPEG"])
            if image.size != (w, h):   # checked before the pixels are decoded: a garbled header may claim any size
                raise TokenizerError(f"JPEG file of {len(data)} bytes is {image.size[1]}x{image.size[0]}, the "
                                     f"tokenizer's size is {h}x{w}")
            image.load()
        except TokenizerError:
            raise
        except UnidentifiedImageError:
            raise TokenizerError(f"JPEG file of {len(data)} bytes does not decode: Pillow finds no JPEG "
                                 "header") from None
        except Exception as err:   # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError... on garbage
            raise TokenizerError(f"JPEG file of {len(data)} bytes does not decode: {_message(err)}") from None
        pixels = np.asarray(image.convert("L" if c == 1 else "RGB"), dtype=np.float32) / 255.0
        return pixels[None] if c == 1 else np.ascontiguousarray(pixels.transpose(2, 0, 1))

    def _decode_h264(self, data: bytes) -> np.ndarray:
        import av

        c, t, h, w = self.input_shape
        frames: list[np.ndarray] = []
        try:
            with av.open(io.BytesIO(data), format="h264") as container:
                for frame in container.decode(video=0):
                    if (frame.height, frame.width) != (h + h % 2, w + w % 2):
                        raise TokenizerError(f"H.264 stream of {len(data)} bytes holds {frame.height}x{frame.width} "
                                             f"frames, the tokenizer's size is {h}x{w}")
                    if len(frames) == t:
                        raise TokenizerError(f"H.264 stream of {len(data)} bytes holds more than the tokenizer's "
                                             f"{t} frames")
                    pixels = frame.to_ndarray(format="gray" if c == 1 else "rgb24")[:h, :w]
                    frames.append(pixels[None] if c == 1 else pixels.transpose(2, 0, 1))
        except TokenizerError:
            raise
        except Exception as err:   # noqa: BLE001 - PyAV raises FFmpegError subclasses, ValueError... on garbage
            raise TokenizerError(f"H.264 stream of {len(data)} bytes does not decode: {_message(err)}") from None
        if len(frames) != t:
            raise TokenizerError(f"H.264 stream of {len(data)} bytes decodes to {len(frames)} frames, the "
                                 f"tokenizer's clips have {t}")
        return (np.stack(frames, axis=1).astype(np.float32) / 255.0)   # x_CTHW

    # ------------------------------------------------------------ stage API

    def encode_arrays(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [self.encode_one(a) for a in arrays]

    def decode_arrays(self, tokens: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [self.decode_one(t) for t in tokens]


def _message(err: Exception) -> str:
    """The codec's words: an FFmpeg error's text without its errno, else the exception's message."""
    return str(getattr(err, "strerror", None) or err or type(err).__name__)


def _library_versions(codec: str) -> dict[str, str]:
    if codec == "jpeg":
        import PIL
        from PIL import features

        return {"Pillow": PIL.__version__, "libjpeg": str(features.version("libjpeg_turbo") or features.version("jpg"))}
    import av

    return {"PyAV": av.__version__, "libavcodec": ".".join(map(str, av.library_versions["libavcodec"])),
            "libx264": _x264_build()}


def _x264_build() -> str:
    """libx264's build as it names itself in the SEI of a one-frame stream ("core 165 r3222 b35605a")."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="h264") as container:
        stream = container.add_stream("libx264", rate=FRAME_RATE)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        frame = av.VideoFrame.from_ndarray(np.zeros((16, 16), dtype=np.uint8), format="gray")
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    text = buf.getvalue()
    at = text.find(b"x264 - core ")
    return text[at + 7:text.find(b" - ", at + 7)].decode("ascii", "replace") if at >= 0 else "unknown"
