"""Readers and tokenizers for images, video, EM volumes and point clouds: plain Python + torch, no Ray.

Readers (one per modality) list a source's partition units cheaply and read
one unit at a time in bounded memory::

    reader = open_reader("image", "./data/digits", size=32, channels=1)
    for unit in reader.units():          # a stage fans these out to Ray tasks
        for sample in reader.read(unit): # Sample(key, data, source_uri, source_digest, label, meta)
            tokens = tokenizer.encode_arrays([sample.data])

Tokenizers (patch_vq, msvq, vqvae, octree, codec) ``fit``/``encode``/``decode`` and
save as a folder (``weights.safetensors`` + ``tokenizer.json``) whose digest
feeds fingerprints; :func:`load_tokenizer` dispatches on the JSON's ``type``.
Bad input raises :class:`SampleError` (a ``UserError``) for the stage to quarantine.
"""

from __future__ import annotations

from typing import Any

from arpipe.pipeline import plugins
from arpipe.schemas.tokenize import SourceBase

from .base import (
    TOKENIZER_TYPES,
    FixedLengthTokenizer,
    Reader,
    Sample,
    SampleError,
    Tokenizer,
    TokenizerError,
    Unit,
    copy_artifact,
    load_tokenizer,
    read_artifact,
    tokenizer_class,
    tokenizer_types,
)
from .codec import CodecTokenizer
from .image import ImageReader
from .metrics import chamfer_distance, codebook_usage, psnr, ssim
from .msvq import MultiScaleVQ
from .octree import OctreeTokenizer
from .patch_vq import PatchVQ
from .pointcloud import PointCloudReader, denormalize
from .video import VideoReader
from .volume import VolumeReader
from .vqvae import VQVAE

READERS: dict[str, type[Reader]] = {
    "image": ImageReader,
    "video": VideoReader,
    "volume": VolumeReader,
    "pointcloud": PointCloudReader,
}


def open_reader(modality: str, uri: str, **options: Any) -> Reader:
    """The reader for ``modality`` on ``uri`` (built in, or an installed plugin's: ``arpipe.readers`` entry
    points); ``options`` are that reader's keyword arguments."""
    cls = READERS.get(modality)
    if cls is None and modality in plugins.declared("arpipe.readers"):
        cls = plugins.implementation("arpipe.readers", modality, SourceBase, Reader)
    if cls is None:
        known = [*READERS, *plugins.declared("arpipe.readers")]
        raise SampleError(uri, f"unknown modality {modality!r}", fix=f"use one of {', '.join(known)}")
    try:
        return cls(uri, **options)
    except TypeError as err:
        raise SampleError(uri, f"bad {modality} reader option ({err})",
                          fix=f"see {cls.__name__}'s documented options") from None


def make_tokenizer(type: str, **config: Any) -> Tokenizer:
    """An unfitted tokenizer of ``type`` (patch_vq, msvq, vqvae, octree, codec) from its config."""
    cls = tokenizer_class(type)
    try:
        return cls(**config)
    except TypeError as err:
        raise TokenizerError(f"bad {type} tokenizer option ({err})", fix=f"see {cls.__name__}'s documented options") from None


__all__ = [
    "READERS", "TOKENIZER_TYPES", "CodecTokenizer", "FixedLengthTokenizer", "ImageReader", "MultiScaleVQ",
    "OctreeTokenizer", "PatchVQ", "PointCloudReader", "Reader", "Sample", "SampleError", "Tokenizer", "TokenizerError", "Unit",
    "VQVAE", "VideoReader", "VolumeReader", "chamfer_distance", "codebook_usage", "copy_artifact", "denormalize", "load_tokenizer",
    "make_tokenizer", "open_reader", "psnr", "read_artifact", "ssim", "tokenizer_class", "tokenizer_types",
]
