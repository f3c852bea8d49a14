"""A user reads skimage's tiny GIF and an mp4 made from it as clips, and tokenizes them as tubelets."""

from __future__ import annotations

import os

import av
import numpy as np
import pytest
import skimage
import torch

from arpipe.stages.modalities import PatchVQ, SampleError, VideoReader, psnr

GIF = os.path.join(os.path.dirname(skimage.__file__), "data", "no_time_for_that_tiny.gif")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Torch on one thread: these tensors are small, and two threads crawl when the machine is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _native_frames() -> np.ndarray:
    """The GIF's 24 frames as (T, H, W, 3) uint8, decoded directly with PyAV."""
    with av.open(GIF) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def write_mp4(path: str, frames_THWC: np.ndarray, fps: int) -> None:
    """libx264 wants even sides: pad by repeating the last row/column."""
    t, h, w, _ = frames_THWC.shape
    frames = np.pad(frames_THWC, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    with av.open(path, "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": "10"}
        for a in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def test_gif_reads_as_24_frames_and_round_trips_through_tubelets():
    native = _native_frames()
    assert native.shape == (24, 25, 14, 3)
    clips = list(VideoReader(GIF, clip_len=24, size=(24, 16)))
    assert len(clips) == 1
    clip = clips[0]
    assert clip.shape == (3, 24, 24, 16) and clip.key == "no_time_for_that_tiny.gif/clip000000"
    assert clip.meta["fps"] == pytest.approx(100 / 7) and clip.meta["source_size"] == [25, 14]

    native_clip = next(iter(VideoReader(GIF, clip_len=24, resize="none")))
    assert np.array_equal(native_clip.data, native.transpose(3, 0, 1, 2).astype(np.float32) / 255)

    tok = PatchVQ(input_shape=(3, 24, 24, 16), patch=(2, 4, 4), codebook_size=64, modality="video")
    tok.fit(torch.from_numpy(clip.data)[None])
    idx = tok.encode_arrays([clip.data])[0]
    assert idx.shape == (12 * 6 * 4,) and tok.layout()["axes"] == ["t", "y", "x"]
    assert tok.positions().shape == (288, 3) and tok.positions()[-1].tolist() == [11, 5, 3]
    back = tok.decode_arrays([idx])[0]
    assert back.shape == clip.shape
    quality = float(psnr(torch.from_numpy(back)[None], torch.from_numpy(clip.data)[None]))
    print(f"\ntubelet patch_vq (2x4x4, K=64) on the GIF: PSNR {quality:.1f} dB")
    assert quality > 22


def test_gif_written_as_mp4_reads_back(tmp_path):
    native = _native_frames()
    path = str(tmp_path / "tiny.mp4")
    write_mp4(path, native, fps=14)
    reader = VideoReader(path, clip_len=8, resize="none")
    clips = list(reader)
    assert [c.meta["clip"] for c in clips] == [0, 1, 2]  # 24 frames -> 3 clips of 8
    video = np.concatenate([c.data for c in clips], axis=1)[:, :, :25, :14]
    original = torch.from_numpy(native.transpose(3, 0, 1, 2).astype(np.float32) / 255)
    assert float(psnr(torch.from_numpy(video)[None], original[None])) > 25  # lossy, but the same video
    assert clips[1].meta["start_time"] == pytest.approx(8 / 14, abs=1e-3)


def test_fps_resampling_picks_the_frame_on_screen():
    native = _native_frames().transpose(0, 3, 1, 2).astype(np.float32) / 255  # 24 frames, 70 ms each
    clip = next(iter(VideoReader(GIF, clip_len=11, fps=7.0, resize="none")))
    expected = [int(np.floor(j / 7.0 / 0.07 + 1e-9)) for j in range(11)]
    assert expected == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
    assert np.array_equal(clip.data.transpose(1, 0, 2, 3), native[expected])
    # 1.68 s at 7 fps is 12 output frames: clips of 4 every 4 -> 3 clips
    assert len(list(VideoReader(GIF, clip_len=4, fps=7.0))) == 3
    # upsampling repeats frames rather than inventing them
    fast = next(iter(VideoReader(GIF, clip_len=48, fps=100 / 3.5, resize="none")))
    assert np.array_equal(fast.data[:, 0], fast.data[:, 1]) and np.array_equal(fast.data[:, 1], native[0])


def test_clip_windows_as_units_match_reading_the_whole_file():
    whole = list(VideoReader(GIF, clip_len=4, stride=2, size=8))
    windowed = VideoReader(GIF, clip_len=4, stride=2, size=8, clips_per_unit=3)
    units = windowed.units()
    assert [(u.start, u.stop) for u in units] == [((0,), (3,)), ((3,), (6,)), ((6,), (9,)), ((9,), ())]
    pieces = [s for u in units for s in windowed.read(u)]
    assert [s.key for s in pieces] == [s.key for s in whole] and len(whole) == 11
    assert all(np.array_equal(a.data, b.data) for a, b in zip(pieces, whole, strict=True))


def test_videos_in_class_folders_get_labels(tmp_path):
    (tmp_path / "dance").mkdir()
    write_mp4(str(tmp_path / "dance" / "a.mp4"), _native_frames()[:8], fps=10)
    got = list(VideoReader(str(tmp_path), clip_len=8, size=8))
    assert [(s.key, s.label) for s in got] == [("dance/a.mp4/clip000000", "dance")]


# ---------------------------------------------------------------- bad input


def test_truncated_mp4_is_a_typed_error(tmp_path):
    path = tmp_path / "full.mp4"
    write_mp4(str(path), _native_frames(), fps=14)
    blob = path.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(SampleError) as err:
        list(VideoReader(str(cut), clip_len=4))
    assert str(cut) in str(err.value) and "re-encode or re-upload" in str(err.value)


def test_truncated_faststart_mp4_fails_mid_stream(tmp_path):
    """With the index up front the header opens fine; the cut shows while decoding."""
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 255, (30, 24, 32, 3), dtype=np.uint8)  # incompressible: frames fill the file
    path = tmp_path / "fast.mp4"
    with av.open(str(path), "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
        for a in noisy:
            for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    blob = path.read_bytes()
    path.write_bytes(blob[: int(len(blob) * 0.6)])
    with pytest.raises(SampleError, match="corrupt or truncated|truncated: decoded"):
        list(VideoReader(str(path), clip_len=4))


def test_not_a_video(tmp_path):
    (tmp_path / "x.mp4").write_bytes(b"\x00" * 1000)
    with pytest.raises(SampleError, match="cannot open video"):
        list(VideoReader(str(tmp_path / "x.mp4")))


def test_video_shorter_than_one_clip():
    with pytest.raises(SampleError, match="has 24 frames, fewer than clip_len=32; lower clip_len"):
        list(VideoReader(GIF, clip_len=32))


def test_frames_over_the_size_limit():
    with pytest.raises(SampleError, match=r"25x14 = 350 pixels, over max_pixels=100"):
        list(VideoReader(GIF, clip_len=4, max_pixels=100))


def test_too_many_frames():
    with pytest.raises(SampleError, match="more than max_frames=10"):
        list(VideoReader(GIF, clip_len=4, max_frames=10))
