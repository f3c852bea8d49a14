"""Configs of the ``tokenizer`` (fit) and ``tokenize`` (apply) stages: sources and tokenizer types.

Source fields mirror the modality readers' options and tokenizer fields the
tokenizers' constructor arguments, so a typo in either is a validation error
with its YAML line.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import Field

from schemas.base import Resources, StageBase, Strict

Size = Union[int, list[int]]  # noqa: UP007


class _Source(Strict):
    uri: str = Field(description="A local path or s3:// URI (file or folder).")

    def reader_options(self) -> dict[str, Any]:
        return self.model_dump(exclude={"modality", "uri"}, exclude_none=True)


class ImageSource(_Source):
    modality: Literal["image"]
    format: Literal["auto", "folder", "webdataset", "array", "npy", "npz"] = "auto"
    size: Size | None = Field(None, description="Output size (square int or [h, w]).")
    resize: Literal["resize_crop", "resize", "center_crop", "none"] = "resize_crop"
    channels: Literal[1, 3] = 3
    labels: str | None = Field("auto", description="'auto', 'folder', a sidecar CSV/JSON path, or null.")
    value_range: list[float] | None = Field(None, description="[lo, hi] of raw values in array files.")
    max_pixels: int = Field(1 << 26, ge=1, description="Reject images with more pixels (quarantined).")
    files_per_unit: int = Field(64, ge=1)
    rows_per_unit: int = Field(1024, ge=1)


class VideoSource(_Source):
    modality: Literal["video"]
    clip_len: int = Field(16, ge=1)
    stride: int | None = Field(None, ge=1)
    fps: float | None = Field(None, gt=0)
    size: Size | None = None
    resize: Literal["resize_crop", "resize", "center_crop", "none"] = "resize_crop"
    channels: Literal[1, 3] = 3
    labels: str | None = "folder"
    max_pixels: int = Field(1 << 24, ge=1)
    max_frames: int | None = Field(None, ge=1)
    clips_per_unit: int | None = Field(None, ge=1)


class VolumeSource(_Source):
    modality: Literal["volume"]
    format: Literal["auto", "tiff", "tiff_folder", "hdf5", "zarr", "mrc", "npy"] = "auto"
    dataset: str | None = Field(None, description="Array inside an HDF5 file or Zarr group.")
    crop: Size = Field(64, description="Crop size (int or [z, y, x]).")
    stride: Size | None = None
    cover: bool = True
    intensity_range: list[float] | None = None
    voxel_size: list[float] | None = None
    max_unit_bytes: int = Field(256 << 20, ge=1)
    max_voxels: int | None = Field(None, ge=1)


class PointCloudSource(_Source):
    modality: Literal["pointcloud"]
    normalize: Literal["unit_sphere", "none"] = "unit_sphere"
    max_points: int = Field(1 << 22, ge=1)
    labels: str | None = "folder"


Source = Annotated[Union[ImageSource, VideoSource, VolumeSource, PointCloudSource],  # noqa: UP007
                   Field(discriminator="modality")]


class _Tokenizer(Strict):
    input_shape: list[int] | None = Field(None, description="Sample shape (C, H, W) / (C, T|D, H, W); "
                                                            "default: the first sample's.")

    def constructor_args(self, input_shape: tuple[int, ...] | None) -> dict[str, Any]:
        args = self.model_dump(exclude={"type", "input_shape"}, exclude_none=True)
        args.pop("fit", None)
        shape = self.input_shape or input_shape
        if shape is not None:
            args["input_shape"] = list(shape)
        return args


class PatchVQConfig(_Tokenizer):
    type: Literal["patch_vq"]
    patch: list[int] = Field(description="Patch size per spatial axis ([p, p] or [t, p, p]).")
    codebook_size: int = Field(512, ge=2)
    seed: int = 0
    fit_vectors: int = Field(200_000, ge=1)
    fit_iters: int = Field(100, ge=1)


class MSVQConfig(_Tokenizer):
    type: Literal["msvq"]
    scales: list[Size] = Field(min_length=1, description="Token grid per scale, coarse to fine.")
    patch: list[int] | None = Field(None, description="Pixels per finest-scale token (default: size / last scale).")
    codebook_size: int = Field(512, ge=2)
    seed: int = 0
    fit_vectors: int = Field(200_000, ge=1)
    fit_iters: int = Field(100, ge=1)
    fit_rounds: int = Field(3, ge=1)

    def constructor_args(self, input_shape: tuple[int, ...] | None) -> dict[str, Any]:
        args = super().constructor_args(input_shape)
        if self.patch is None and "input_shape" in args:
            last = self.scales[-1]
            spatial = args["input_shape"][1:]
            grid = [last] * len(spatial) if isinstance(last, int) else list(last)
            args["patch"] = [max(1, s // g) for s, g in zip(spatial, grid)]
        return args


class VQVAEFit(Strict):
    steps: int = Field(2000, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0)
    time_limit_s: float | None = Field(None, gt=0)


class VQVAEConfig(_Tokenizer):
    type: Literal["vqvae"]
    downsample: Size = 4
    codebook_size: int = Field(512, ge=2)
    hidden: int = Field(64, ge=1)
    code_dim: int = Field(16, ge=1)
    beta: float = Field(0.25, ge=0)
    dead_threshold: float = Field(0.03, ge=0)
    ema_decay: float = Field(0.9, ge=0, le=1)
    usage_decay: float = Field(0.99, ge=0, le=1)
    device: str = Field("auto", description="auto (GPU when present), cpu or cuda.")
    seed: int = 0
    fit: VQVAEFit = Field(default_factory=VQVAEFit)


class OctreeConfig(_Tokenizer):
    type: Literal["octree"]
    depth: int = Field(8, ge=1, le=20)
    half_extent: float = Field(1.0, gt=0)
    tolerance: float = Field(1e-4, ge=0)

    def constructor_args(self, input_shape: tuple[int, ...] | None) -> dict[str, Any]:
        return self.model_dump(exclude={"type", "input_shape"})


TokenizerConfig = Annotated[Union[PatchVQConfig, MSVQConfig, VQVAEConfig, OctreeConfig],  # noqa: UP007
                            Field(discriminator="type")]


class FitSpec(Strict):
    max_samples: int = Field(4096, ge=1, description="Samples read to fit (the first ones, in source order).")
    heldout: int = Field(64, ge=0, description="Samples after those, kept for reconstruction metrics.")


class TokenizerStage(StageBase):
    """Fits a tokenizer on a sample of a source; output ``tokenizer`` (an artifact folder)."""

    # a data-parallel vqvae fit depends on the worker count (sharding, batch split): it is not runtime-only
    runtime_fields: ClassVar[frozenset[str]] = StageBase.runtime_fields - {"workers"}
    output_names: ClassVar[tuple[str, ...]] = ("tokenizer",)

    kind: Literal["tokenizer"]
    source: Source
    tokenizer: TokenizerConfig
    fit: FitSpec = Field(default_factory=FitSpec)
    workers: int = Field(1, ge=1, description="Ray Train workers that fit a vqvae data-parallel "
                                              "(one CPU each; one GPU each when resources.num_gpus > 0).")
    resources: Resources = Field(default_factory=Resources, description="Ray resources of the fit task; "
                                 "for a vqvae, num_gpus > 0 gives each Ray Train worker one GPU.")


class ShardSpec(Strict):
    samples_per_shard: int = Field(4096, ge=1)


class TokenizeStage(StageBase):
    """Applies a tokenizer to a source on Ray; output ``store`` (a token store)."""

    runtime_fields: ClassVar[frozenset[str]] = StageBase.runtime_fields
    output_names: ClassVar[tuple[str, ...]] = ("store",)

    kind: Literal["tokenize"]
    source: Source
    tokenizer: str = Field(description="Tokenizer artifact, usually `${fit_tok.tokenizer}`.")
    shards: ShardSpec = Field(default_factory=ShardSpec)
    workers: int = Field(2, ge=1, description="Concurrent Ray tasks (one CPU each).")
    max_reject_fraction: float = Field(0.01, ge=0, le=1,
                                       description="Fail when more than this share of samples is rejected.")
    progress: bool = True
