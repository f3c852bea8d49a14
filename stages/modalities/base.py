"""Contracts shared by every reader and tokenizer: samples, units, errors, artifacts.

A tokenize stage partitions a source into :class:`Unit` s (cheap to list, small
to pickle, JSON-able for the run ledger), reads each unit in a Ray task with a
:class:`Reader` and encodes the :class:`Sample` s it yields. Bad input raises
:class:`SampleError`, which the stage quarantines instead of skipping silently.

A tokenizer is saved as a folder holding ``weights.safetensors`` and
``tokenizer.json``; its digest (sha256 of the canonical JSON, which itself
records the sha256 of the weights) is what downstream fingerprints depend on.
"""

from __future__ import annotations

import contextlib
import importlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from arpipe.pipeline import plugins
from arpipe.pipeline.digest import digest_bytes, digest_json, hex_of
from arpipe.pipeline.errors import UserError
from arpipe.pipeline.storage import join, storage_for
from arpipe.schemas.tokenize import TokenizerBase

ARTIFACT_FORMAT = 1
WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "tokenizer.json"


# --------------------------------------------------------------------- errors


class SampleError(UserError):
    """One sample (or one source file) cannot be used; the stage quarantines it.

    The message is one line: the source, what is wrong, how to fix it.
    """

    def __init__(self, source: str, reason: str, fix: str | None = None):
        self.source, self.reason = source, reason
        super().__init__(reason, where=source, fix=fix)

    def __reduce__(self):
        # Ray and multiprocessing pickle exceptions; keep the constructor arguments.
        return (type(self), (self.source, self.reason, self.fix))


class TokenizerError(UserError):
    """A tokenizer artifact or a tokenizer call is unusable (bad artifact, wrong input shape)."""

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None):
        super().__init__(what, where=where, fix=fix)

    def __reduce__(self):
        return (_rebuild_tokenizer_error, (self.what, self.where, self.fix))


def _rebuild_tokenizer_error(what: str, where: str | None, fix: str | None) -> TokenizerError:
    return TokenizerError(what, where=where, fix=fix)


# ------------------------------------------------------------ units, samples


@dataclass(frozen=True)
class Unit:
    """One independently readable part of a source: the stage's work item.

    ``kind`` is ``file`` (one file, or ``members`` files below ``uri``), ``tar``
    (one WebDataset shard), ``rows`` (rows ``start[0]:stop[0]`` of an array file),
    ``crops`` (the crops whose windows lie inside the region ``start``..``stop``
    of a volume) or ``clips`` (clips ``start[0]:stop[0]`` of a video, or all
    clips when ``stop`` is empty). ``size`` is a byte estimate for balancing.
    ``digest`` is the source file's digest when the listing computed it (a
    window of clips of a video on s3: the unit then reads only the bytes up to
    its clips, not the whole file to name where they came from).
    """

    uri: str
    kind: str
    key: str
    members: tuple[str, ...] = ()
    start: tuple[int, ...] = ()
    stop: tuple[int, ...] = ()
    size: int = 0
    digest: str | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if d["digest"] is None:   # the records of units without one read as before the field existed
            del d["digest"]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Unit:
        return cls(uri=d["uri"], kind=d["kind"], key=d["key"], members=tuple(d.get("members", ())),
                   start=tuple(d.get("start", ())), stop=tuple(d.get("stop", ())), size=int(d.get("size", 0)),
                   digest=d.get("digest"))


@dataclass(frozen=True)
class SkippedFile:
    """A file below a source that its reader does not read, and why: reported, never dropped silently.

    ``kind`` is what the stage counts it under: the suffix (``.gif``), ``hidden``,
    ``broken link``, ``label sidecar`` ...; ``reason`` says what is wrong and how to
    have the file read.
    """

    uri: str
    relpath: str
    kind: str
    reason: str


@dataclass
class Sample:
    """One item to tokenize.

    ``key`` is unique within a source: the file's relative path (with its
    extension), followed by ``/<member>`` for samples inside a file (tar
    member, array row, clip, crop).
    ``data`` layouts (float32): image ``x_CHW`` and video ``x_CTHW`` in [0, 1],
    volume ``x_CDHW`` (C = 1) scaled by the reader's intensity rule, point
    cloud ``xyz_N3`` normalized as ``meta['center']``/``meta['scale']`` say.
    ``caption`` is the text describing it, when the reader's ``captions`` option is set (captions.py).
    ``source_digest`` is the sha256 of the bytes the sample came from: the
    file for whole-file samples and video clips, the raw array region
    (dtype, shape, values) for rows of an array file and volume crops.
    """

    key: str
    data: np.ndarray
    modality: str
    source_uri: str
    source_digest: str
    label: str | int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    caption: str | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)


class Reader(ABC):
    """Streams samples of one modality from a URI, unit by unit, in bounded memory.

    :meth:`units` also sets :attr:`skipped`: the files below the source that no
    unit reads (other formats, hidden files, sidecars it consumes), for the stage
    to report, so that every file is stored, quarantined or counted as skipped.
    """

    modality: ClassVar[str]

    def __init__(self, uri: str):
        self.uri = uri
        self.skipped: list[SkippedFile] = []

    @abstractmethod
    def units(self) -> list[Unit]:
        """The source's partition units, listed from metadata only (no pixel is decoded)."""

    @abstractmethod
    def read(self, unit: Unit) -> Iterator[Sample | SampleError]:
        """The samples of one unit; memory stays bounded by the unit, not the source.

        A bad file ends the unit with a raised SampleError; a bad sample the reader can read on past
        (a member of a tar shard) is yielded as its SampleError instead, for the stage to quarantine.
        """

    def __iter__(self) -> Iterator[Sample]:
        for unit in self.units():
            for item in self.read(unit):
                if isinstance(item, SampleError):
                    raise item
                yield item


# ------------------------------------------------------------------ tokenizers

#: type -> "module:Class", imported on first use so that loading one tokenizer imports only it
TOKENIZER_TYPES: dict[str, str] = {
    "patch_vq": "arpipe.stages.modalities.patch_vq:PatchVQ",
    "msvq": "arpipe.stages.modalities.msvq:MultiScaleVQ",
    "flexvq": "arpipe.stages.modalities.flexvq:FlexScaleVQ",
    "vqvae": "arpipe.stages.modalities.vqvae:VQVAE",
    "octree": "arpipe.stages.modalities.octree:OctreeTokenizer",
    "codec": "arpipe.stages.modalities.codec:CodecTokenizer",
    "text": "arpipe.stages.modalities.text:TextTokenizer",
}


def tokenizer_types() -> list[str]:
    """Every tokenizer type: the built-in ones and the installed plugins' (``arpipe.tokenizers`` entry points)."""
    return sorted({*TOKENIZER_TYPES, *plugins.declared("arpipe.tokenizers")})


def tokenizer_class(type_: str) -> type[Tokenizer]:
    if type_ in TOKENIZER_TYPES:
        module, _, name = TOKENIZER_TYPES[type_].partition(":")
        return getattr(importlib.import_module(module), name)
    if type_ in plugins.declared("arpipe.tokenizers"):
        return plugins.implementation("arpipe.tokenizers", type_, TokenizerBase, Tokenizer)
    raise TokenizerError(f"unknown tokenizer type {type_!r}", fix=f"use one of {', '.join(tokenizer_types())}")


class Tokenizer(ABC):
    """Maps samples to integer tokens and back.

    Subclasses set ``type`` and implement the encode/decode pair on batched
    tensors, :meth:`config` (constructor keyword arguments, JSON-able) and
    :meth:`state_tensors`/:meth:`load_state_tensors` for what was learned.
    ``layout()`` describes token positions for the AR model: ``axes`` names
    the columns of :meth:`positions` (grid coordinates of every token).
    """

    type: ClassVar[str]
    #: constructor arguments that change where it runs, not what it computes (kept out of config())
    runtime_options: ClassVar[tuple[str, ...]] = ()
    #: what the tokenizer learned besides its weights (fit statistics); saved in tokenizer.json
    fit_info: dict[str, Any]
    #: how the fit ran (seconds, device): saved in tokenizer.json but outside the digest, so an
    #: identical refit on other hardware or a busier machine keeps the same digest
    provenance: dict[str, Any]

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def tokens_per_sample(self) -> int | None:
        """Token count of every sample, or None when it varies (octree, codec)."""

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """Constructor keyword arguments, JSON-able: ``cls(**config())`` rebuilds an unfitted twin."""

    @abstractmethod
    def layout(self) -> dict[str, Any]:
        """Token layout metadata: ``axes``, grid sizes, scale or level boundaries."""

    @abstractmethod
    def positions(self, idx_L: torch.Tensor | None = None) -> torch.Tensor:
        """``pos_LK`` integer coordinates of each token (K = len(layout()['axes']))."""

    @abstractmethod
    def state_tensors(self) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None: ...

    #: whether :meth:`fit` learns anything (a stage can skip reading data when not)
    learned: ClassVar[bool] = True

    def fit(self, samples: Sequence[np.ndarray] | torch.Tensor, **options: Any) -> Tokenizer:
        """Learn from sample arrays; tokenizers with nothing to learn (octree) keep this one."""
        return self

    @abstractmethod
    def encode_arrays(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Stage entry point: sample arrays (``Sample.data``) -> int64 token arrays."""

    @abstractmethod
    def decode_arrays(self, tokens: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Inverse of :meth:`encode_arrays` (up to quantization)."""

    def code_embeddings(self) -> torch.Tensor | None:
        """``codebook_KD``: the latent vector each code stands for, whose distances say which codes are
        interchangeable (LANTERN's neighbourhoods, ``relaxed:`` in the sample stage); ``None`` when codes
        have no such geometry (octree cells, text pieces)."""
        return None

    # ------------------------------------------------------------- artifact

    def describe(self) -> dict[str, Any]:
        """The content of tokenizer.json without the weights' digest."""
        return {
            "format": ARTIFACT_FORMAT,
            "type": self.type,
            "config": self.config(),
            "vocab_size": self.vocab_size,
            "tokens_per_sample": self.tokens_per_sample,
            "layout": self.layout(),
            "fit": getattr(self, "fit_info", {}),
        }

    def artifact(self) -> tuple[bytes, dict[str, Any]]:
        """(weights bytes, tokenizer.json document with its digest)."""
        from safetensors.torch import save

        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_tensors().items()}
        weights = save(tensors)
        doc = self.describe()
        doc["weights_sha256"] = digest_bytes(weights)
        doc["digest"] = digest_json(doc)
        doc["provenance"] = getattr(self, "provenance", {})
        return weights, doc

    @property
    def digest(self) -> str:
        """sha256 of the artifact's canonical JSON (which names the weights' sha256), provenance left out."""
        return self.artifact()[1]["digest"]

    def save(self, uri: str) -> str:
        """Write the artifact folder (local or s3://); tokenizer.json goes last. Returns the digest."""
        weights, doc = self.artifact()
        store = storage_for(uri)
        store.write_bytes(join(uri, WEIGHTS_FILE), weights)
        store.write_text(join(uri, CONFIG_FILE), json.dumps(doc, indent=2, sort_keys=True) + "\n")
        return doc["digest"]


def read_artifact(uri: str) -> tuple[dict[str, Any], bytes]:
    """tokenizer.json and the weights of an artifact folder, both checked against their digests."""
    store = storage_for(uri)
    cfg_uri = join(uri, CONFIG_FILE)
    try:
        doc = json.loads(store.read_text(cfg_uri))
        weights = store.read_bytes(join(uri, WEIGHTS_FILE))
    except FileNotFoundError as err:
        raise TokenizerError(f"tokenizer artifact incomplete: {err.filename or err} is missing", where=uri,
                             fix="point to a folder written by a tokenizer stage or Tokenizer.save") from None
    except json.JSONDecodeError as err:
        raise TokenizerError(f"tokenizer.json is not valid JSON ({err.msg} at line {err.lineno})",
                             where=cfg_uri, fix="re-create the artifact with Tokenizer.save") from None
    if not isinstance(doc, dict):
        raise TokenizerError(f"tokenizer.json holds a JSON {type(doc).__name__}, not an object", where=cfg_uri,
                             fix="re-create the artifact with Tokenizer.save")
    if doc.get("format") != ARTIFACT_FORMAT:
        raise TokenizerError(f"unsupported tokenizer artifact format {doc.get('format')!r}", where=cfg_uri,
                             fix=f"re-create it with this arpipe (format {ARTIFACT_FORMAT})")
    body = {k: v for k, v in doc.items() if k not in ("digest", "provenance")}
    if hex_of(digest_json(body)) != hex_of(str(doc.get("digest"))):
        raise TokenizerError("tokenizer.json does not match its digest (edited by hand?)", where=cfg_uri,
                             fix="re-create the artifact with Tokenizer.save instead of editing it")
    if hex_of(digest_bytes(weights)) != hex_of(str(doc.get("weights_sha256"))):
        raise TokenizerError("weights.safetensors does not match the sha256 in tokenizer.json", where=uri,
                             fix="the artifact is corrupt or mixed from two runs: re-create it")
    if doc.get("type") not in tokenizer_types():
        raise TokenizerError(f"unknown tokenizer type {doc.get('type')!r}", where=cfg_uri,
                             fix=f"an artifact of this arpipe has one of {', '.join(tokenizer_types())} (a plugin's "
                                 "type needs the plugin installed)")
    return doc, weights


def copy_artifact(uri: str, dest: str) -> None:
    """Copy the tokenizer artifact at ``uri`` to the folder ``dest`` (local or s3://), checked on the way:
    how a model folder carries the tokenizers it needs."""
    _doc, weights = read_artifact(uri)
    store = storage_for(dest)
    store.write_bytes(join(dest, WEIGHTS_FILE), weights)
    store.write_bytes(join(dest, CONFIG_FILE), storage_for(uri).read_bytes(join(uri, CONFIG_FILE)))


def load_tokenizer(uri: str, device: str | None = None) -> Tokenizer:
    """Load an artifact folder; dispatches on tokenizer.json's ``type`` and verifies both digests."""
    from safetensors.torch import load

    doc, weights = read_artifact(uri)
    cls = tokenizer_class(doc["type"])
    config = dict(doc["config"])
    if device is not None and "device" in cls.runtime_options:
        config["device"] = device
    tok = cls(**config)
    tok.load_state_tensors(load(weights))
    tok.fit_info = dict(doc.get("fit", {}))
    tok.provenance = dict(doc.get("provenance", {}))
    return tok


def resolve_device(device: str) -> torch.device:
    """A tokenizer's ``device`` option: ``auto`` -> CUDA when present, else CPU; anything else as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TokenizerError(f"device {device!r} requested but CUDA is not available",
                             fix="use device: auto or cpu (a tokenize stage: resources.num_gpus: 0), or install a "
                                 "CUDA build of torch on the GPU nodes")
    return torch.device(device)


@contextlib.contextmanager
def full_float32(device: torch.device) -> Iterator[None]:
    """On CUDA, matmuls and convolutions in full float32 while the block runs (cuDNN uses TF32 for convolutions
    by default, which rounds inputs to 10 bits of mantissa): a GPU then encodes as the CPU does, up to float
    rounding, so a store's tokens do not depend on where its units ran. Elsewhere it changes nothing."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def by_shape(arrays: Sequence[Any]) -> list[tuple[tuple[int, ...], list[int]]]:
    """Indices of ``arrays`` grouped by shape, groups in order of first appearance: samples of several sizes
    (a flexvq store) are batched one size at a time."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, a in enumerate(arrays):
        groups.setdefault(tuple(np.shape(a)), []).append(i)
    return list(groups.items())


def as_batch(arrays: Sequence[np.ndarray] | np.ndarray | torch.Tensor) -> torch.Tensor:
    """Stack sample arrays into one float32 tensor (no copy for a tensor already batched)."""
    if isinstance(arrays, torch.Tensor):
        return arrays.float()
    if isinstance(arrays, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(arrays, dtype=np.float32))
    return torch.from_numpy(np.stack([np.asarray(a, dtype=np.float32) for a in arrays]))


def check_input_shape(x: torch.Tensor, expected: Sequence[int], tokenizer: str) -> None:
    """Fixed-grid tokenizers accept one shape; say which reader option fixes a mismatch."""
    if tuple(x.shape[1:]) != tuple(expected):
        raise TokenizerError(
            f"{tokenizer} tokenizer expects samples of shape {tuple(expected)}, got {tuple(x.shape[1:])}",
            fix="set the reader's size/crop (and channels) to match the tokenizer's input_shape")


class FixedLengthTokenizer(Tokenizer):
    """A tokenizer whose samples all have one shape and one token count (patch_vq, msvq, vqvae).

    Subclasses implement ``encode(x_B...) -> idx_BL`` and ``decode(idx_BL) -> x_B...`` on ``device``:
    :meth:`encode_arrays` and :meth:`decode_arrays` move each batch there and the results back to CPU
    numpy. A subclass that can run on a GPU lists ``device`` in ``runtime_options`` and takes it in its
    constructor; the others stay on the CPU.
    """

    #: samples per encode call in :meth:`encode_arrays` (bounds the memory of a stage task)
    batch_size: int = 256
    codebook_size: int
    #: where encode and decode run (set by a subclass's ``device`` option)
    device: torch.device = torch.device("cpu")

    @property
    def vocab_size(self) -> int:
        return self.codebook_size

    @abstractmethod
    def encode(self, x: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def decode(self, idx_BL: torch.Tensor) -> torch.Tensor: ...

    def encode_arrays(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        with full_float32(self.device):
            for s in range(0, len(arrays), self.batch_size):
                idx_BL = self.encode(as_batch(arrays[s:s + self.batch_size]).to(self.device))
                out.extend(idx_BL.cpu().numpy())
        return out

    def decode_arrays(self, tokens: Sequence[np.ndarray]) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        with full_float32(self.device):
            for s in range(0, len(tokens), self.batch_size):
                idx_BL = torch.from_numpy(np.stack([np.asarray(t, dtype=np.int64)
                                                    for t in tokens[s:s + self.batch_size]]))
                out.extend(self.decode(idx_BL.to(self.device)).cpu().numpy())
        return out


def check_tokens(idx_BL: torch.Tensor, length: int | None, vocab_size: int, tokenizer: str) -> None:
    """Decoding garbage would return garbage quietly: reject wrong lengths and out-of-range ids."""
    if length is not None and (idx_BL.dim() != 2 or idx_BL.shape[1] != length):
        raise TokenizerError(f"{tokenizer} decodes {length} tokens per sample, got shape {tuple(idx_BL.shape)}",
                             fix="pass token sequences produced by this tokenizer")
    if idx_BL.numel() and (int(idx_BL.min()) < 0 or int(idx_BL.max()) >= vocab_size):
        raise TokenizerError(f"{tokenizer} token ids must lie in [0, {vocab_size})",
                             fix="pass token sequences produced by this tokenizer")
