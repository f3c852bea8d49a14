"""Video reader: mp4/webm/mkv/mov/avi/gif through PyAV, as fixed-length clips.

Frames are decoded one at a time, resampled to ``fps`` by presentation time
(each output instant takes the frame on screen then), resized, and kept in a
ring buffer of ``clip_len`` frames: memory is one clip, whatever the video's
length. Clip ``k`` covers resampled frames ``k*stride .. k*stride+clip_len-1``.
Samples are ``x_CTHW`` float32 in [0, 1] (channels first, as 3-D
convolutions and tubelet tokenizers want them).

A unit is one file, or with ``clips_per_unit`` a window of clips of one file
(the frame count comes from container metadata; the last window of a file is
open-ended, so a short count never drops clips). Windows decode from the
file's start, so every unit sees the same frame timeline. On s3 a window's
unit reads the file through a RangedFile from its start to its last clip
(overshooting by at most one fetch; the listing digests each file once for
the units to carry); a whole-file unit downloads the file: it needs every byte. Files of other
formats and hidden files are listed in ``skipped`` with the reason. With
``captions`` set, every clip carries its video's caption (see captions.py).
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import torch

from arpipe.pipeline.digest import digest_file
from arpipe.pipeline.storage import is_s3

from .base import Reader, Sample, SampleError, Unit
from .captions import Captions
from .image import RESIZE_MODES, as_size, fit_to_size
from .sources import RangedFile, digest_source, is_dir, local_file, scan_files

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".gif", ".m4v")
#: PyAV's read size; on s3 its reads go to a streaming RangedFile, which grows its GETs as PyAV reads on
RANGED_READ_BYTES = 64 << 10


class VideoReader(Reader):
    """Clips of ``clip_len`` frames every ``stride`` frames, at ``fps`` (None: the native frame rate)."""

    modality = "video"

    def __init__(self, uri: str, *, clip_len: int = 16, stride: int | None = None, fps: float | None = None,
                 size: int | Sequence[int] | None = None, resize: str = "resize_crop", channels: int = 3,
                 labels: str | None = "folder", max_pixels: int = 1 << 24, max_frames: int | None = None,
                 clips_per_unit: int | None = None, captions: str | None = None, captions_required: bool = False):
        super().__init__(uri)
        if clip_len < 1 or (stride is not None and stride < 1):
            raise SampleError(uri, "clip_len and stride must be at least 1", fix="set clip_len/stride >= 1")
        if fps is not None and fps <= 0:
            raise SampleError(uri, f"fps must be positive, got {fps}", fix="set fps > 0 or leave it unset")
        if resize not in RESIZE_MODES:
            raise SampleError(uri, f"unknown resize mode {resize!r}", fix=f"use one of {', '.join(RESIZE_MODES)}")
        if channels not in (1, 3):
            raise SampleError(uri, f"channels must be 1 or 3, got {channels}", fix="set channels: 1 or 3")
        self.clip_len, self.stride = int(clip_len), int(stride or clip_len)
        self.fps = None if fps is None else float(fps)
        self.size, self.resize, self.channels, self.labels = as_size(size), resize, channels, labels
        self.max_pixels, self.max_frames = int(max_pixels), max_frames
        self.clips_per_unit = clips_per_unit
        self.captions, self.captions_required = captions, bool(captions_required)
        self._captions: Captions | None = None

    # ------------------------------------------------------------------ units

    def units(self) -> list[Unit]:
        out = []
        captions = self._caption_finder()
        files, self.skipped = scan_files(self.uri, VIDEO_SUFFIXES, "video",
                                         sidecars=captions.sidecars() if captions else None)
        if captions is not None:
            captions.table()   # a sidecar that does not parse fails the listing, not every unit
            self.skipped = captions.relabel(files, self.skipped)
        for f in files:
            if not self.clips_per_unit:
                out.append(Unit(f.uri, "clips", f.relpath, members=(f.relpath,), size=f.size))
                continue
            n = self.count_clips(f.uri)
            step = int(self.clips_per_unit)
            starts = list(range(0, max(n, 1), step))
            digest = digest_source(f.uri) if is_s3(f.uri) else None
            for i, c in enumerate(starts):
                stop = () if i == len(starts) - 1 else (c + step,)
                out.append(Unit(f.uri, "clips", f.relpath, members=(f.relpath,), start=(c,), stop=stop,
                                size=f.size // len(starts), digest=digest))
        return out

    def _caption_finder(self) -> Captions | None:
        """How each video finds its caption (None without ``captions``): below the source folder, or beside
        the one video a file source names."""
        if self.captions is not None and self._captions is None:
            root = self.uri if is_dir(self.uri) else self.uri.rsplit("/", 1)[0]
            self._captions = Captions(root, self.captions, self.captions_required)
        return self._captions

    def count_clips(self, uri: str) -> int:
        """Clip count from container metadata (no decoding); an estimate the last unit absorbs."""
        import av

        with _video_file(uri, ranged=True) as path:
            try:
                with av.open(path, buffer_size=RANGED_READ_BYTES) as container:
                    stream = container.streams.video[0]
                    rate = float(stream.average_rate or stream.base_rate or 0) or None
                    if stream.duration is not None and stream.time_base is not None:
                        seconds = float(stream.duration * stream.time_base)
                    elif container.duration is not None:
                        seconds = container.duration / 1e6
                    else:
                        seconds = (stream.frames or 0) / (rate or 1)
                    frames = stream.frames if self.fps is None and stream.frames else round(seconds * (self.fps or rate or 1))
            except (av.FFmpegError, IndexError) as err:
                raise SampleError(uri, f"cannot open video ({err})", fix="re-encode the file (e.g. ffmpeg -i in out.mp4)") from None
        return max(0, (frames - self.clip_len) // self.stride + 1)

    # ------------------------------------------------------------------- read

    def read(self, unit: Unit) -> Iterator[Sample]:
        first = unit.start[0] if unit.start else 0
        last = unit.stop[0] if unit.stop else None
        rel = unit.members[0] if unit.members else PurePosixPath(unit.uri).name
        label = None
        if self.labels == "folder" and str(PurePosixPath(rel).parent) not in ("", "."):
            label = PurePosixPath(rel).parent.name
        captions = self._caption_finder()
        caption = None if captions is None else captions.of(unit.uri[len(captions.root.rstrip("/")) + 1:], unit.uri)
        ranged = is_s3(unit.uri) and unit.digest is not None
        with _video_file(unit.uri, ranged) as path:
            digest = unit.digest if ranged else digest_file(path)
            window: deque[torch.Tensor] = deque(maxlen=self.clip_len)
            times: deque[float] = deque(maxlen=self.clip_len)
            info: dict[str, Any] = {}
            seen = 0
            for j, (t, x_CHW) in enumerate(self._frames(path, unit.uri, info)):
                window.append(x_CHW)
                times.append(t)
                seen = j + 1
                if j + 1 < self.clip_len or (j + 1 - self.clip_len) % self.stride:
                    continue
                k = (j + 1 - self.clip_len) // self.stride
                if last is not None and k >= last:
                    break
                if k < first:
                    continue
                yield Sample(key=f"{unit.key}/clip{k:06d}", data=torch.stack(list(window), dim=1).numpy(),
                             modality=self.modality, source_uri=unit.uri, source_digest=digest, label=label,
                             caption=caption,
                             meta={"clip": k, "start_frame": k * self.stride, "start_time": round(times[0], 6),
                                   "fps": info["fps"], "frames": self.clip_len, "source_size": info["source_size"]})
            if seen < self.clip_len:
                raise SampleError(unit.uri, f"video has {seen} frames{' at ' + str(self.fps) + ' fps' if self.fps else ''}, "
                                  f"fewer than clip_len={self.clip_len}", fix="lower clip_len (or fps)")

    def _frames(self, path: str | RangedFile, source: str, info: dict[str, Any]) -> Iterator[tuple[float, torch.Tensor]]:
        """(time, ``x_CHW``) at the output frame rate, resized; checks the container as it goes.
        Fills ``info`` with the output fps and the source frame size before the first frame."""
        import av

        try:
            container = av.open(path, buffer_size=RANGED_READ_BYTES)
        except av.FFmpegError as err:
            raise SampleError(source, f"cannot open video ({err})",
                              fix="the file is truncated or not a video: re-encode or re-upload it") from None
        with container:
            if not container.streams.video:
                raise SampleError(source, "file has no video stream", fix="remove it from the video source")
            stream = container.streams.video[0]
            h, w = stream.codec_context.height, stream.codec_context.width
            if h * w > self.max_pixels:
                raise SampleError(source, f"video frames are {h}x{w} = {h * w} pixels, over max_pixels={self.max_pixels}",
                                  fix="raise max_pixels or downscale the video")
            native = float(stream.average_rate or stream.base_rate or 25)
            info.update(fps=self.fps or native, source_size=[h, w])
            step = 1.0 / info["fps"]
            fmt = "rgb24" if self.channels == 3 else "gray"
            decoded, out, t0, last_t = 0, 0, None, 0.0
            held: tuple[Any, torch.Tensor | None] | None = None  # (frame, converted tensor once needed)

            def convert(frame: Any) -> torch.Tensor:
                a = frame.to_ndarray(format=fmt)
                a = a[:, :, None] if a.ndim == 2 else a
                x_1CHW = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))[None].float().div_(255)
                return fit_to_size(x_1CHW, self.size, self.resize, source)[0]

            try:
                for frame in container.decode(stream):
                    decoded += 1
                    if self.max_frames is not None and decoded > self.max_frames:
                        raise SampleError(source, f"video has more than max_frames={self.max_frames} frames",
                                          fix="raise max_frames or split the video")
                    t = float(frame.time) if frame.time is not None else (decoded - 1) / native
                    t0 = t if t0 is None else t0
                    if self.fps is None:
                        yield t - t0, convert(frame)
                        continue
                    # emit the held frame for every output instant before this frame appears
                    while held is not None and out * step < t - t0 - 1e-9:
                        if held[1] is None:
                            held = (held[0], convert(held[0]))
                        yield out * step, held[1]
                        out += 1
                    held = (frame, None)
                    last_t = t - t0
            except av.FFmpegError as err:
                raise SampleError(source, f"video is corrupt or truncated after {decoded} frames ({err})",
                                  fix="re-encode or re-upload the file") from None
            if stream.frames and decoded < stream.frames:
                raise SampleError(source, f"video is truncated: decoded {decoded} of {stream.frames} frames",
                                  fix="re-encode or re-upload the file")
            if decoded == 0:
                raise SampleError(source, "video has no decodable frames", fix="re-encode or re-upload the file")
            if held is not None:  # the last frame stays on screen for one native frame duration
                while out * step < last_t + 1.0 / native - 1e-9:
                    if held[1] is None:
                        held = (held[0], convert(held[0]))
                    yield out * step, held[1]
                    out += 1


def _video_file(uri: str, ranged: bool) -> contextlib.AbstractContextManager[str | RangedFile]:
    """What PyAV opens: the path of a local file; on s3 a RangedFile when ``ranged``, else a downloaded copy."""
    if ranged and is_s3(uri):
        return RangedFile(uri, streaming=True)
    return local_file(uri)
