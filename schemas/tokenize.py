"""Configs of the ``tokenizer`` (fit) and ``tokenize`` (apply) stages: sources and tokenizer types.

Source fields mirror the modality readers' options and tokenizer fields the
tokenizers' constructor arguments, so a typo in either is a validation error
with its YAML line.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import Field, model_validator

from arpipe.schemas.base import Resources, StageBase, Strict

Size = Union[int, list[int]]  # noqa: UP007


class SourceBase(Strict):
    """What every source has: a ``uri``. A reader plugin's source model subclasses it (docs/extending.md):
    its other fields are the reader's keyword arguments."""

    uri: str = Field(description="A local path or s3:// URI (file or folder).")

    def reader_options(self) -> dict[str, Any]:
        options = self.model_dump(exclude={"modality", "uri"}, exclude_none=True)
        if "labels" in type(self).model_fields and self.labels is None:
            options["labels"] = None   # null means unlabelled: not the reader's default
        return options


class _Captioned(SourceBase):
    captions: str | None = Field(
        None, description="Where each sample's caption is read, to be stored with its tokens (docs/conditioning.md): "
                          "`auto` (a `captions.csv`/`.json`/`.jsonl` sidecar keyed by file name at the folder root, "
                          "or beside a one-file source; else a `.txt` beside each file with its stem), `beside`, or "
                          "a sidecar's path; in WebDataset shards a sample's `.txt` member or the `caption`/`text` "
                          "field of its `.json`. A video's clips and a volume's crops carry its caption. Null: none.")
    captions_required: bool = Field(False, description="Quarantine a sample whose caption is missing or empty (a "
                                                       "volume without one fails the stage); default: such a "
                                                       "sample is stored without a caption.")


class ImageSource(_Captioned):
    """Images from a file, or from every file below a folder (recursively).

    A folder's ``.png``, ``.jpg``/``.jpeg``, ``.tif``/``.tiff``, ``.webp``, ``.bmp`` and ``.gif``
    files are read, a GIF as one image, its first frame (read animated GIFs with a video source);
    ``webdataset`` reads ``.tar`` shards, ``array`` reads ``.npy``/``.npz``. Every other file is
    skipped and reported, never dropped silently: other formats, hidden files (a name starting with
    '.'), the label sidecar, links to nothing. Each gets a row in the stage's ``rejects.arrow`` whose
    reason starts with ``skipped:``, and is counted per kind (``.doc: 1, hidden: 2``) in the stage's
    log line and in MLflow (``skipped``, ``skipped_doc``, ...). Skipped files are not rejects:
    ``max_reject_fraction`` does not count them.
    """

    modality: Literal["image"]
    format: Literal["auto", "folder", "webdataset", "array", "npy", "npz"] = Field(
        "auto", description="How `uri` is read: `auto` goes by suffix (a folder holding .tar files is "
                            "WebDataset), else `folder`, `webdataset` or `array` (also spelt `npy`/`npz`).")
    size: Size | None = Field(None, description="Output size (square int or [h, w]).")
    resize: Literal["resize_crop", "resize", "center_crop", "none"] = Field(
        "resize_crop", description="How images reach `size`: `resize_crop` scales the shorter side to fit then "
                                   "crops the centre (no distortion), `resize` stretches, `center_crop` only "
                                   "crops, `none` keeps the source size.")
    channels: Literal[1, 3] = Field(3, description="Output channels: 3 (RGB; gray is repeated, alpha dropped) "
                                                   "or 1 (luma).")
    labels: str | None = Field("auto", description="'auto', 'folder', a sidecar CSV/JSON path, or null.")
    value_range: list[float] | None = Field(None, description="[lo, hi] of raw values in array files.")
    max_pixels: int = Field(1 << 26, ge=1, description="Reject images with more pixels (quarantined).")
    files_per_unit: int = Field(64, ge=1, description="Image files per work unit (one Ray task) when reading a "
                                                      "folder.")
    rows_per_unit: int = Field(1024, ge=1, description="Rows per work unit when reading an .npy array (read by "
                                                       "byte range; an .npz is always one unit).")
    transform: Literal["none", "canny", "sobel"] = Field(
        "none", description="Read each image as its control map (ControlAR) instead: `canny` edges or `sobel` "
                            "gradient magnitude of its luma at the output size (scikit-image); to fit a control "
                            "tokenizer. See docs/conditioning.md.")
    transform_sigma: float = Field(1.0, gt=0, description="Gaussian smoothing of the Canny edge detector.")


class VideoSource(_Captioned):
    """Clips of the ``.mp4``, ``.webm``, ``.mkv``, ``.mov``, ``.avi``, ``.m4v`` and ``.gif`` files below a
    folder (recursively); other files are skipped and reported as for images."""

    modality: Literal["video"]
    clip_len: int = Field(16, ge=1, description="Frames per clip, counted at the output frame rate.")
    stride: int | None = Field(None, ge=1, description="Frames between the starts of consecutive clips "
                                                      "(default: clip_len, clips that do not overlap).")
    fps: float | None = Field(None, gt=0, description="Frame rate the video is resampled to before cutting "
                                                      "clips (default: the video's native rate).")
    size: Size | None = Field(None, description="Frame size (square int or [h, w]; default: the source size).")
    resize: Literal["resize_crop", "resize", "center_crop", "none"] = Field(
        "resize_crop", description="How frames reach `size`: `resize_crop` scales the shorter side to fit then "
                                   "crops the centre (no distortion), `resize` stretches, `center_crop` only "
                                   "crops, `none` keeps the source size.")
    channels: Literal[1, 3] = Field(3, description="Output channels: 3 (RGB) or 1 (gray).")
    labels: str | None = Field("folder", description="`folder`: a clip's class label is its file's sub-folder "
                                                     "name; null: clips are unlabelled.")
    max_pixels: int = Field(1 << 24, ge=1, description="Reject videos whose frames have more pixels "
                                                       "(height x width) than this (quarantined).")
    max_frames: int | None = Field(None, ge=1, description="Reject videos with more decoded frames than this "
                                                           "(quarantined; default: no limit).")
    clips_per_unit: int | None = Field(None, ge=1, description="Clips per work unit, so one long video is read "
                                                               "by several tasks (default: one unit per file).")


class VolumeSource(_Captioned):
    """Crops of one 3-D volume: a file, a Zarr folder, or a folder of TIFF slices (its top-level ``.tif``
    files in natural order; other files, hidden ones and sub-folders are skipped and reported as for
    images). A slice that does not decode loses the crops through it (quarantined), not the volume;
    the first slice sets the shape, so the stage fails when that one does not."""

    modality: Literal["volume"]
    format: Literal["auto", "tiff", "tiff_folder", "hdf5", "zarr", "mrc", "npy"] = Field(
        "auto", description="File format (default: inferred from the suffix; a folder of .tif slices is "
                            "`tiff_folder`).")
    dataset: str | None = Field(None, description="Array inside an HDF5 file or Zarr group.")
    crop: Size = Field(64, description="Crop size (int or [z, y, x]).")
    stride: Size | None = Field(None, description="Voxels between crop origins (int or [z, y, x]; default: "
                                                  "crop, crops that do not overlap).")
    cover: bool = Field(True, description="Add a last crop flush with the far edge of each axis, so no voxel "
                                          "is left out.")
    intensity_range: list[float] | None = Field(
        None, description="[lo, hi] of raw values mapped to 0..1, clipped (default: integers scaled by their "
                          "dtype's range, floats kept as they are).")
    voxel_size: list[float] | None = Field(None, description="Voxel spacing [z, y, x] recorded with each "
                                                             "sample (default: what the file says, if anything).")
    max_unit_bytes: int = Field(256 << 20, ge=1, description="Bytes of the region one work unit reads at most; "
                                                             "neighbouring crops are grouped up to it.")
    max_voxels: int | None = Field(None, ge=1, description="Reject volumes with more voxels than this (default: "
                                                           "no limit).")


class PointCloudSource(SourceBase):
    """Point clouds from the ``.ply``, ``.npy``/``.npz``, ``.xyz``/``.txt``/``.pts`` and ``.las``/``.laz`` files
    below a folder (recursively; a ``.txt`` is read as XYZ text); other files are skipped and reported as for
    images."""

    modality: Literal["pointcloud"]
    normalize: Literal["unit_sphere", "none"] = Field(
        "unit_sphere", description="`unit_sphere` centres each cloud on its bounding-box centre and scales its "
                                   "farthest point onto the unit sphere (centre and scale are kept to undo it); "
                                   "`none` keeps the coordinates.")
    max_points: int = Field(1 << 22, ge=1, description="Reject clouds with more points than this (quarantined).")
    labels: str | None = Field("folder", description="`folder`: a cloud's class label is its file's sub-folder "
                                                     "name; null: clouds are unlabelled.")


Source = Annotated[Union[ImageSource, VideoSource, VolumeSource, PointCloudSource],  # noqa: UP007
                   Field(discriminator="modality")]


class TokenizerBase(Strict):
    """What every grid tokenizer's config has: ``input_shape``. A tokenizer plugin's config model subclasses it
    (docs/extending.md): its other fields are the tokenizer's constructor arguments."""

    input_shape: list[int] | None = Field(None, description="Sample shape (C, H, W) / (C, T|D, H, W); "
                                                            "default: the first sample's.")

    def constructor_args(self, input_shape: tuple[int, ...] | None) -> dict[str, Any]:
        args = self.model_dump(exclude={"type", "input_shape"}, exclude_none=True)
        args.pop("fit", None)
        shape = self.input_shape or input_shape
        if shape is not None:
            args["input_shape"] = list(shape)
        return args


class PatchVQConfig(TokenizerBase):
    type: Literal["patch_vq"]
    patch: list[int] = Field(description="Patch size per spatial axis ([p, p] or [t, p, p]).")
    codebook_size: int = Field(512, ge=2, description="Codes (k-means centroids): the tokenizer's vocabulary "
                                                      "size.")
    seed: int = Field(0, description="Seeds the subsampling of fit vectors and the k-means initialization.")
    fit_vectors: int = Field(200_000, ge=1, description="Most patch vectors k-means fits on (a random subset "
                                                        "when the fit samples hold more).")
    fit_iters: int = Field(100, ge=1, description="Mini-batch k-means iterations (4096 vectors each).")


class MSVQConfig(TokenizerBase):
    type: Literal["msvq"]
    scales: list[Size] = Field(min_length=1, description="Token grid per scale, coarse to fine.")
    patch: list[int] | None = Field(None, description="Pixels per finest-scale token (default: size / last scale).")
    codebook_size: int = Field(512, ge=2, description="Codes in the one codebook all scales share: the "
                                                      "tokenizer's vocabulary size.")
    seed: int = Field(0, description="Seeds the subsampling of fit vectors and the k-means initialization.")
    fit_vectors: int = Field(200_000, ge=1, description="Most residual vectors each k-means round fits on (a "
                                                        "random subset when there are more).")
    fit_iters: int = Field(100, ge=1, description="Mini-batch k-means iterations per round (4096 vectors each).")
    fit_rounds: int = Field(3, ge=1, description="Rounds of k-means, each on the residuals the previous round's "
                                                 "codebook leaves at every scale.")

    def constructor_args(self, input_shape: tuple[int, ...] | None) -> dict[str, Any]:
        args = super().constructor_args(input_shape)
        if self.patch is None and "input_shape" in args:
            last = self.scales[-1]
            spatial = args["input_shape"][1:]
            grid = [last] * len(spatial) if isinstance(last, int) else list(last)
            args["patch"] = [max(1, s // g) for s, g in zip(spatial, grid)]
        return args


class VQVAEFit(Strict):
    steps: int = Field(2000, ge=1, description="Training steps; the learning-rate schedule spans them.")
    batch_size: int = Field(64, ge=1, description="Samples per step over all workers (split between them).")
    lr: float = Field(2e-3, gt=0, description="Peak AdamW learning rate (linear warm-up over the first 5%, "
                                              "then cosine decay to 2% of it).")
    time_limit_s: float | None = Field(None, gt=0, description="Seconds after which training ends even if "
                                                               "steps remain; the schedule then runs on the "
                                                               "clock (default: no limit).")


class FlexVQConfig(TokenizerBase):
    """FlexVAR's scales: each scale is the image itself at that resolution, quantized (no residual), so one
    store holds images of several sizes and a next_scale model samples at any of them (docs/paradigms.md)."""

    type: Literal["flexvq"]
    sizes: list[Size] | None = Field(None, min_length=1, description="Image sizes it takes (side, or [h, w]); a "
                                                                     "size's tokens are the scales up to its "
                                                                     "grid, size / patch. Default: the fit "
                                                                     "samples' size.")
    scales: list[Size] = Field(min_length=1, description="Token grid per scale, coarse to fine; holds every "
                                                         "size's grid and ends at the largest's.")
    patch: list[int] = Field(min_length=2, max_length=2, description="Pixels per token, [p, p], at every scale.")
    codebook_size: int = Field(512, ge=2, description="Codes in the one codebook all scales share: the "
                                                      "tokenizer's vocabulary size.")
    seed: int = Field(0, description="Seeds the subsampling of fit vectors and the k-means initialization.")
    fit_vectors: int = Field(200_000, ge=1, description="Most patch vectors (of every scale) k-means fits on (a "
                                                        "random subset when there are more).")
    fit_iters: int = Field(100, ge=1, description="Mini-batch k-means iterations (4096 vectors each).")


class VQVAEConfig(TokenizerBase):
    type: Literal["vqvae"]
    downsample: Size = Field(4, description="Input cells per token: a power of two for every axis, or one per "
                                            "spatial axis (e.g. [1, 4, 4] for per-frame video tokens).")
    codebook_size: int = Field(512, ge=2, description="Codes in the codebook: the tokenizer's vocabulary size.")
    hidden: int = Field(64, ge=1, description="Channels of the convolutional encoder and decoder.")
    code_dim: int = Field(16, ge=1, description="Length of each code vector (the encoder's output channels).")
    beta: float = Field(0.25, ge=0, description="Weight of the commitment loss that keeps encoder outputs near "
                                                "their codes.")
    dead_threshold: float = Field(0.03, ge=0, description="A code whose usage falls below this fraction of "
                                                          "uniform (1 / codebook_size) is restarted on an "
                                                          "encoder output.")
    ema_decay: float = Field(0.9, ge=0, le=1, description="Decay of the moving averages the codebook follows "
                                                          "(online k-means); higher moves codes more slowly.")
    usage_decay: float = Field(0.99, ge=0, le=1, description="Decay of each code's moving-average usage, which "
                                                             "dead_threshold is compared with.")
    device: str = Field("auto", description="auto (GPU when present), cpu or cuda.")
    seed: int = Field(0, description="Seeds weight initialization, batch sampling and dead-code restarts.")
    fit: VQVAEFit = Field(default_factory=VQVAEFit, description="Training schedule of the fit.")


class OctreeConfig(TokenizerBase):
    type: Literal["octree"]
    depth: int = Field(8, ge=1, le=20, description="Octree levels: points are quantized to a 2^depth voxel "
                                                   "grid per side, the resolution decoding is lossless at.")
    half_extent: float = Field(1.0, gt=0, description="Half side of the cube [-half_extent, half_extent]^3 "
                                                      "points must lie in (1 fits the reader's unit_sphere "
                                                      "normalization).")
    tolerance: float = Field(1e-4, ge=0, description="Relative slack: coordinates up to half_extent * (1 + "
                                                     "tolerance) in magnitude are accepted and clipped into "
                                                     "the cube.")

    def constructor_args(self, input_shape: tuple[int, ...] | None) -> dict[str, Any]:
        return self.model_dump(exclude={"type", "input_shape"})


class CodecConfig(TokenizerBase):
    """JPEG-LM: an image's tokens are the bytes of its JPEG file, a video clip's the bytes of its H.264 stream,
    then an end token (vocabulary 257); nothing is fitted (docs/tokenizers.md)."""

    type: Literal["codec"]
    quality: int = Field(25, ge=1, le=100, description="JPEG quality (Pillow, 1..100) of images; JPEG-LM uses 25.")
    subsampling: Literal["4:4:4", "4:2:2", "4:2:0"] = Field(
        "4:2:0", description="JPEG chroma subsampling of RGB images (gray images have no chroma).")
    crf: int = Field(28, ge=0, le=51, description="H.264 constant rate factor of video (libx264, 0..51; lower is "
                                                  "better quality and longer streams).")
    preset: Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower",
                    "veryslow"] = Field("medium", description="libx264 speed/compression preset of video.")
    gop: int = Field(16, ge=1, description="Frames between H.264 keyframes (a clip's first frame is always one).")


class TextConfig(Strict):
    """Captions to tokens: fitted on the source's captions with Hugging Face `tokenizers`, or a given file."""

    type: Literal["text"]
    model: Literal["bpe", "unigram"] = Field("bpe", description="Subword model fitted on the captions (byte-level: "
                                                               "any UTF-8 text encodes, nothing is unknown).")
    vocab_size: int = Field(1024, ge=260, description="Vocabulary size the fit aims at (the 256 byte tokens and "
                                                      "[PAD], [UNK] included; a small corpus may give fewer).")
    lowercase: bool = Field(False, description="Lower-case texts before tokenizing (NFKC normalisation always).")
    file: str | None = Field(None, description="A Hugging Face tokenizer.json to use as it is instead of fitting "
                                               "(a local path or s3:// URI; never downloaded from a hub).")

    def constructor_args(self, input_shape: tuple[int, ...] | None) -> dict[str, Any]:
        return self.model_dump(exclude={"type"})


TokenizerConfig = Annotated[Union[PatchVQConfig, MSVQConfig, FlexVQConfig, VQVAEConfig, OctreeConfig, CodecConfig,  # noqa: UP007
                                  TextConfig],
                            Field(discriminator="type")]


class FitSpec(Strict):
    max_samples: int = Field(4096, ge=1, description="Samples read to fit (the first ones, in source order).")
    heldout: int = Field(64, ge=0, description="Samples held out of the fit (picked evenly among the max_samples + heldout read) for reconstruction metrics.")


class TokenizerStage(StageBase):
    """Fits a tokenizer on a sample of a source; output ``tokenizer`` (an artifact folder)."""

    # a data-parallel vqvae fit depends on the worker count (sharding, batch split): it is not runtime-only
    runtime_fields: ClassVar[frozenset[str]] = StageBase.runtime_fields - {"workers"}
    output_names: ClassVar[tuple[str, ...]] = ("tokenizer",)

    kind: Literal["tokenizer"]
    source: Source = Field(description="Data to fit on; `modality` picks the reader.")
    tokenizer: TokenizerConfig = Field(description="Tokenizer to fit; `type` picks it.")
    fit: FitSpec = Field(default_factory=FitSpec, description="How many samples to fit on and to hold out.")
    workers: int = Field(1, ge=1, description="Ray Train workers that fit a vqvae data-parallel "
                                              "(one CPU each; one GPU each when resources.num_gpus > 0).")
    resources: Resources = Field(default_factory=Resources, description="Ray resources of the fit task; "
                                 "for a vqvae, num_gpus > 0 gives each Ray Train worker one GPU.")


class ShardSpec(Strict):
    samples_per_shard: int = Field(4096, ge=1, description="Most samples per store shard; each work unit "
                                                           "fills shards of this size, its last may be smaller.")


class ControlSpec(Strict):
    """Each image's control map (ControlAR), encoded by its own tokenizer: computed from the image (`transform`)
    or read from a second source whose files pair with the images by name (`source`)."""

    transform: Literal["canny", "sobel"] | None = Field(
        None, description="`canny` edges or `sobel` gradient magnitude of the image's luma at its stored size "
                          "(scikit-image); the tokenizer is fitted on a source with the same `transform`.")
    sigma: float = Field(1.0, gt=0, description="Gaussian smoothing of the Canny edge detector.")
    source: ImageSource | None = Field(
        None, description="A folder of control maps (depth, segmentation, edges drawn by another tool) paired "
                          "with the images by relative path without extension: `maps/7/0012.png` is the map of "
                          "`images/7/0012.jpg`. An image without a map is quarantined, a map without an image "
                          "is reported as skipped; both sources must be image folders. The maps are read at the control "
                          "tokenizer's input size and channels.")
    tokenizer: str = Field(description="Image tokenizer of the control maps, e.g. `${fit_edges.tokenizer}` from a "
                                       "tokenizer stage fitted on such maps.")

    @model_validator(mode="after")
    def _one_origin(self) -> ControlSpec:
        if (self.transform is None) == (self.source is None):
            raise ValueError("give the control maps as transform: canny|sobel (computed from each image) or as "
                             "source: {modality: image, uri: <folder of maps>} (paired by file name), one of them")
        return self


class TokenizeStage(StageBase):
    """Applies a tokenizer to a source on Ray; output ``store`` (a token store)."""

    runtime_fields: ClassVar[frozenset[str]] = StageBase.runtime_fields
    output_names: ClassVar[tuple[str, ...]] = ("store",)

    kind: Literal["tokenize"]
    source: Source = Field(description="Data to tokenize; `modality` picks the reader.")
    tokenizer: str = Field(description="Tokenizer artifact, usually `${fit_tok.tokenizer}`.")
    text_tokenizer: str | None = Field(
        None, description="A `text` tokenizer artifact (e.g. `${fit_text.tokenizer}`) that encodes each sample's "
                          "caption into the store beside its tokens (needs `source.captions`).")
    control: ControlSpec | None = Field(None, description="Also store each image's control map (ControlAR: "
                                                          "edges computed from it), tokenized, beside its tokens.")
    shards: ShardSpec = Field(default_factory=ShardSpec, description="How encoded samples are cut into "
                                                                     "store shards.")
    workers: int = Field(2, ge=1, description="Work units encoded at once: Ray tasks, or with resources.num_gpus "
                                              "> 0 as many Ray actors (each with `resources`).")
    resources: Resources = Field(
        default_factory=Resources, description="Ray resources of each unit's task (default one CPU); num_gpus > 0 "
        "encodes on `workers` actors that each hold that share of a GPU (patch_vq, msvq, vqvae; octree, codec "
        "and text tokenizers encode on the CPU whatever it asks for). See docs/tokenizers.md.")
    max_reject_fraction: float = Field(0.01, ge=0, le=1,
                                       description="Fail when more than this share of samples is rejected.")
    progress: bool = Field(True, description="Print units done/total, samples encoded, samples/s, elapsed and "
                                             "ETA (a line per 10 s, one updating bar on a terminal).")
