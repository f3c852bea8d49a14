"""Feature extractors for FID/KID/precision-recall (images) and FVD (video).

No package ships Inception or I3D weights for offline use, so the network is a
TorchScript file the user provides (a local path, ``file://`` or ``s3://`` URI).
TorchScript archives hold code and tensors, not arbitrary pickled objects, and
need no Python class to load::

    torch.jit.save(torch.jit.script(net), "inception.pt")      # once, where the weights are
    extractor = FeatureExtractor.load("s3://models/inception.pt", kind="image", input_size=299)
    feats_ND = extractor.features(images_NCHW)                  # floats in [0, 1]
    fid = frechet_from_features(feats_ND, reference_feats_MD)

``extractor.digest`` (sha256 of the file) goes into fingerprints, so a
different network never reuses cached reference statistics.
"""

from __future__ import annotations

import io
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from arpipe.pipeline.digest import digest_bytes
from arpipe.pipeline.storage import storage_for

Kind = Literal["image", "video"]

_EXPORT_HINT = ("export your Inception/I3D network with torch.jit.script (or torch.jit.trace) "
                "and save it with torch.jit.save")


def _read(uri: str) -> bytes:
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    try:
        # S3 goes through the shared storage layer: boto3 with the standard AWS_* variables,
        # AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL for S3-compatible stores
        return storage_for(path).read_bytes(path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise ValueError(f"feature network {uri!r} not found: give the path of a TorchScript file "
                         f"({_EXPORT_HINT})") from None


class FeatureExtractor:
    """A TorchScript network that maps images ``(N, C, H, W)`` or videos ``(N, C, T, H, W)`` to
    feature vectors ``(N, D)``. Get one with :meth:`load`."""

    def __init__(self, module: torch.jit.ScriptModule, *, kind: Kind, digest: str, uri: str = "",
                 input_size: int | None = None, input_range: tuple[float, float] = (0.0, 1.0),
                 device: str | torch.device = "cpu"):
        if kind not in ("image", "video"):
            raise ValueError(f"kind must be 'image' or 'video', got {kind!r}")
        self.module = module.eval()
        self.kind = kind
        self.uri = uri
        self.input_size = input_size
        self.input_range = input_range
        self.device = torch.device(device)
        self._digest = digest

    @classmethod
    def load(cls, uri: str, *, kind: Kind, input_size: int | None = None,
             input_range: tuple[float, float] = (0.0, 1.0), device: str | torch.device = "cpu") -> FeatureExtractor:
        """Load a TorchScript feature network from a local path, ``file://`` or ``s3://`` URI.

        ``input_size``: side the frames are resized to (bilinear), e.g. 299 for Inception, 224 for
        I3D; None feeds them as they are. ``input_range``: the value range the network expects;
        inputs in [0, 1] are mapped onto it linearly, e.g. ``(0, 255)`` or ``(-1, 1)``.
        """
        if kind not in ("image", "video"):
            raise ValueError(f"kind must be 'image' or 'video', got {kind!r}")
        data = _read(uri)
        try:
            module = torch.jit.load(io.BytesIO(data), map_location=device)
        except Exception as err:  # torch raises RuntimeError/ValueError/pickle errors depending on the bytes
            first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ValueError(f"feature network {uri!r} is not a TorchScript file ({first_line}): "
                             f"{_EXPORT_HINT}") from None
        digest = digest_bytes(data)
        return cls(module, kind=kind, digest=digest, uri=uri, input_size=input_size,
                   input_range=input_range, device=device)

    @property
    def digest(self) -> str:
        """``sha256:<hex>`` of the network file, for fingerprints."""
        return self._digest

    def __repr__(self) -> str:
        return (f"FeatureExtractor({self.uri or '<module>'!r}, kind={self.kind!r}, "
                f"input_size={self.input_size}, {self._digest[:19]})")

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Channels to 3, frames resized, values mapped from [0, 1] to ``input_range``."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, *x.shape[2:])
        if self.input_size is not None and tuple(x.shape[-2:]) != (self.input_size,) * 2:
            size = (self.input_size, self.input_size)
            if self.kind == "image":
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            else:  # resize each frame: (N, C, T, H, W) -> (N*T, C, H, W) and back
                n, c, t = x.shape[:3]
                frames = x.permute(0, 2, 1, 3, 4).reshape(n * t, c, *x.shape[-2:])
                frames = F.interpolate(frames, size=size, mode="bilinear", align_corners=False)
                x = frames.reshape(n, t, c, *size).permute(0, 2, 1, 3, 4)
        low, high = self.input_range
        return x * (high - low) + low if (low, high) != (0.0, 1.0) else x

    def _check(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
        axes = "(N, C, H, W)" if self.kind == "image" else "(N, C, T, H, W)"
        if x.ndim != (4 if self.kind == "image" else 5) or x.shape[1] not in (1, 3):
            raise ValueError(f"{self.kind} input must be {axes} with C = 1 or 3, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{self.kind} input must be floats in [0, 1], got {x.dtype}: divide uint8 data by 255")
        if x.numel() and (float(x.min()) < -0.5 or float(x.max()) > 1.5):
            raise ValueError(f"{self.kind} input must be floats in [0, 1], got values in "
                             f"[{float(x.min()):.3g}, {float(x.max()):.3g}]: rescale it first")
        # slight overshoot (decoder outputs) is clipped rather than fed outside the trained range
        return x.float().clamp(0, 1)

    def features(self, x: np.ndarray | torch.Tensor, *, batch_size: int = 64) -> np.ndarray:
        """Feature vectors ``(N, D)`` float64 of images ``(N, C, H, W)`` or videos ``(N, C, T, H, W)``
        with values in [0, 1] (C = 1 is repeated to 3 channels)."""
        x = self._check(x)
        out = []
        with torch.no_grad():
            for s in range(0, x.shape[0], batch_size):
                y = self.module(self._prepare(x[s:s + batch_size].to(self.device)))
                if not isinstance(y, torch.Tensor):
                    raise ValueError(f"feature network {self.uri!r} returned {type(y).__name__}, not a tensor: "
                                     "export a wrapper whose forward returns the feature tensor")
                out.append(y.reshape(y.shape[0], -1).double().cpu())
        if not out:
            raise ValueError(f"no {self.kind}s given (shape {tuple(x.shape)})")
        return torch.cat(out).numpy()

