"""Classification Accuracy Score (CAS): a classifier fitted on real data judges class-conditional samples.

A sample drawn for class ``"3"`` should be classified as a 3. The share of samples
the judge assigns to the class they were drawn for is the CAS: near 1 when samples
show their class, near ``1 / classes`` for noise or samples that ignore the class.
The judge needs no pretrained weights: fit it on the training data, e.g.
scikit-learn's ``LogisticRegression`` on :func:`classifier_features` (no scaler on
pixels: docs/evaluation.md says why)::

    x_NF = classifier_features("image", images_CHW, image_size=16, channels=1)
    skops.io.dump(LogisticRegression(max_iter=3000).fit(x_NF, labels), "digits.skops")
    # later, in the evaluate stage:
    judge = Classifier.load_bytes(open("digits.skops", "rb").read(), "digits.skops")
    predicted = judge.predict("image", samples_CHW, image_size=16)

Accepted files, by extension:

- ``.skops``: a scikit-learn estimator saved with ``skops.io.dump``. Loading builds
  only the types it lists and refuses any outside scikit-learn and numpy, so a file
  from elsewhere cannot run code. The recommended format.
- ``.joblib`` / ``.pkl`` / ``.pickle`` are refused: unpickling runs whatever code the
  file names, and arpipe never loads pickles (a one-line error says how to convert).
- ``.pt``: a TorchScript module (``torch.jit.save``) whose forward maps inputs to
  logits ``(N, K)``. Class ``i`` is ``str(i)`` unless the module has a ``classes``
  attribute (a list of strings); images are fed with the samples' channel count
  unless it has an int ``channels`` attribute.

Inputs (:func:`classifier_features`): images are resized to ``image_size`` (bilinear,
antialiased, as the image reader resizes), converted to the judge's channel count
(luminance for grey) and flattened, values in [0, 1]; TorchScript gets them as
``(N, C, S, S)``. Volumes and point clouds have no weight-free image-like input,
so the judge sees a short vector of shape statistics (:func:`volume_statistics`,
:func:`cloud_statistics`).

Plain Python, numpy and torch; errors are :class:`ClassifierError` (what + fix).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from arpipe.pipeline.digest import digest_bytes

Format = Literal["skops", "torchscript"]
FORMATS: dict[str, Format] = {".skops": "skops", ".pt": "torchscript"}
PICKLES = (".joblib", ".pkl", ".pickle")
#: skops builds types from these packages only; anything else in a file is refused
TRUSTED_PACKAGES = ("sklearn", "numpy")
MODALITIES = ("image", "volume", "pointcloud")

HISTOGRAM_BINS = 16   # intensity (volumes) and radial-distance (point clouds) histograms
VOLUME_GRID = 4       # volumes: mean intensity over a 4 x 4 x 4 grid of blocks
LUMINANCE = (0.299, 0.587, 0.114)   # ITU-R BT.601 weights, as PIL's convert("L")

FIT_HINT = "fit it on stages.evaluation.classifier.classifier_features of real data (see examples/digits_steps.py)"


class ClassifierError(ValueError):
    """A classifier file or its inputs are unusable: ``what`` is wrong, ``fix`` says what to do."""

    def __init__(self, what: str, fix: str = ""):
        self.what, self.fix = what, fix
        super().__init__(f"{what}; {fix}" if fix else what)


# ---------------------------------------------------------------------------- inputs


def image_batch(images: Sequence[np.ndarray], image_size: int | None = None, channels: int | None = None) -> np.ndarray:
    """Images ``x_CHW`` (or ``x_HW``) in [0, 1] as one float32 array ``(N, C, S, S)``.

    ``image_size``: side every image is resized to (None: the first image's height and width, which
    others are resized to); ``channels``: 1 (grey, by luminance) or 3 (grey repeated); None: the
    first image's.
    """
    import torch
    import torch.nn.functional as F

    out = []
    for x in images:
        x = np.asarray(x, dtype=np.float32)
        x_CHW = x[None] if x.ndim == 2 else x
        if x_CHW.ndim != 3 or x_CHW.shape[0] not in (1, 3, 4):
            raise ClassifierError(f"an image of shape {x.shape} is not (C, H, W) with C = 1 or 3",
                                  fix="judge images decoded by an image tokenizer")
        x_CHW = x_CHW[:3]   # RGBA: the judge sees colour, not transparency
        want = channels = channels or x_CHW.shape[0]   # None: the first image's, for all
        if want == 1 and x_CHW.shape[0] == 3:
            x_CHW = np.tensordot(np.asarray(LUMINANCE, dtype=np.float32), x_CHW, axes=1)[None]
        elif want == 3 and x_CHW.shape[0] == 1:
            x_CHW = np.repeat(x_CHW, 3, axis=0)
        out.append(x_CHW)
    if not out:
        return np.zeros((0, channels or 1, image_size or 1, image_size or 1), dtype=np.float32)
    size = (image_size, image_size) if image_size else out[0].shape[1:]
    resized = []
    for x_CHW in out:
        if x_CHW.shape[1:] != size:
            x_1CHW = torch.from_numpy(np.ascontiguousarray(x_CHW))[None]
            x_CHW = F.interpolate(x_1CHW, size=size, mode="bilinear", antialias=True,
                                  align_corners=False)[0].numpy()
        resized.append(x_CHW)
    return np.clip(np.stack(resized), 0.0, 1.0).astype(np.float32)


def volume_statistics(x_CDHW: np.ndarray) -> np.ndarray:
    """What a volume judge sees: 80 numbers.

    The share of voxels in each of 16 equal intensity bins over [0, 1], then the mean
    intensity of each block of a 4 x 4 x 4 grid over the volume (z, y, x order): the
    intensity distribution and the coarse layout, whatever the crop size.
    """
    import torch
    import torch.nn.functional as F

    x = np.asarray(x_CDHW, dtype=np.float32)
    x_CDHW = x[None] if x.ndim == 3 else x
    if x_CDHW.ndim != 4 or min(x_CDHW.shape[1:]) < 1:
        raise ClassifierError(f"a volume of shape {x.shape} is not (C, D, H, W)",
                              fix="judge volumes decoded by a volume tokenizer")
    grey_DHW = x_CDHW.mean(axis=0)
    counts, _ = np.histogram(np.clip(grey_DHW, 0, 1), bins=HISTOGRAM_BINS, range=(0.0, 1.0))
    grid = F.adaptive_avg_pool3d(torch.from_numpy(np.ascontiguousarray(grey_DHW))[None, None], VOLUME_GRID)
    return np.concatenate([counts / grey_DHW.size, grid.reshape(-1).numpy()]).astype(np.float32)


def cloud_statistics(xyz_N3: np.ndarray) -> np.ndarray:
    """What a point-cloud judge sees: 19 numbers.

    The eigenvalues of the points' covariance, largest first (extent along the principal
    axes: rod, disc or ball, and size), then the share of points in each of 16 equal bins
    of distance from the centroid, over [0, farthest point] (hollow shell or filled,
    whatever the scale). Invariant to rotation, translation and point order.
    """
    xyz = np.asarray(xyz_N3, dtype=np.float64)
    if xyz.ndim != 2 or xyz.shape[1] != 3 or len(xyz) < 2:
        raise ClassifierError(f"a point cloud of shape {xyz.shape} is not (N, 3) with N >= 2",
                              fix="judge clouds decoded by a point-cloud tokenizer")
    centred = xyz - xyz.mean(axis=0)
    eigen = np.sort(np.linalg.eigvalsh(np.cov(centred, rowvar=False)))[::-1]
    radius = np.linalg.norm(centred, axis=1)
    counts, _ = np.histogram(radius / max(float(radius.max()), 1e-12), bins=HISTOGRAM_BINS, range=(0.0, 1.0))
    return np.concatenate([eigen, counts / len(xyz)]).astype(np.float32)


def classifier_features(modality: str, arrays: Sequence[np.ndarray], *, image_size: int | None = None,
                        channels: int | None = None) -> np.ndarray:
    """The ``(N, F)`` float32 inputs a scikit-learn judge of ``modality`` is fitted on and scored with.

    Images: :func:`image_batch` flattened (``C * S * S`` values in [0, 1]); volumes:
    :func:`volume_statistics`; point clouds: :func:`cloud_statistics`.
    """
    if modality == "image":
        x_NCHW = image_batch(arrays, image_size, channels)
        return x_NCHW.reshape(len(x_NCHW), -1)
    if modality == "volume":
        return np.stack([volume_statistics(a) for a in arrays]) if len(arrays) else np.zeros((0, 80), np.float32)
    if modality == "pointcloud":
        return np.stack([cloud_statistics(a) for a in arrays]) if len(arrays) else np.zeros((0, 19), np.float32)
    raise ClassifierError(f"no classifier input for modality {modality!r}",
                          fix=f"give classifiers for {', '.join(MODALITIES)}")


# ---------------------------------------------------------------------------- the judge


@dataclass
class Classifier:
    """A loaded judge: ``model`` (a fitted scikit-learn estimator or a TorchScript module) and its
    class labels as strings, in the order of its outputs."""

    model: Any
    format: Format
    classes: list[str]
    digest: str
    #: scikit-learn: how many features it was fitted on (None when it does not say)
    n_features: int | None = None
    #: TorchScript: the image channels it expects (None: the samples' own)
    channels: int | None = None

    @classmethod
    def load_bytes(cls, data: bytes, name: str) -> Classifier:
        """A judge from a file's bytes; ``name`` (the file name) gives the format by its extension."""
        suffix = "." + name.rsplit(".", 1)[-1].lower() if "." in name.rsplit("/", 1)[-1] else ""
        fmt = FORMATS.get(suffix)
        if suffix in PICKLES:
            raise ClassifierError(f"a {suffix} file is a pickle, and loading one runs whatever code it names; "
                                  "arpipe never loads pickles",
                                  fix="convert it once, on your machine: skops.io.dump(joblib.load(path), "
                                      "'judge.skops')")
        if fmt is None:
            raise ClassifierError(f"cannot tell the classifier format of {suffix or 'a file without extension'}",
                                  fix="save it as .skops (skops.io.dump) or .pt (torch.jit.save)")
        digest = digest_bytes(data)
        if fmt == "torchscript":
            return cls._torchscript(data, digest)
        model = _load_skops(data)
        if not (hasattr(model, "predict") and hasattr(model, "classes_")):
            raise ClassifierError(f"the {fmt} file holds a {type(model).__name__}, not a fitted scikit-learn "
                                  "classifier (no predict and classes_)",
                                  fix="save the estimator after fit(), e.g. LogisticRegression().fit(x, labels)")
        n = getattr(model, "n_features_in_", None)
        return cls(model, fmt, [str(c) for c in model.classes_], digest, n_features=int(n) if n else None)

    @classmethod
    def _torchscript(cls, data: bytes, digest: str) -> Classifier:
        import torch

        try:
            module = torch.jit.load(io.BytesIO(data), map_location="cpu")
            module.eval()
        except Exception as err:  # torch raises RuntimeError/ValueError/pickle errors depending on the bytes
            first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ClassifierError(f"the .pt file is not a TorchScript module ({first_line})",
                                  fix="save the classifier with torch.jit.save(torch.jit.script(net), path)") from None
        classes = getattr(module, "classes", None)
        channels = getattr(module, "channels", None)
        return cls(module, "torchscript", [str(c) for c in classes] if classes is not None else [], digest,
                   channels=int(channels) if channels is not None else None)

    def check_classes(self, labels: Sequence[str], whose: str) -> None:
        """Every label must be a class the judge outputs (TorchScript without ``classes``: any index)."""
        if self.format == "torchscript" and not self.classes:
            return   # checked against the logits' width in predict
        check_classes(labels, self.classes, whose)

    def predict(self, modality: str, arrays: Sequence[np.ndarray], *, image_size: int | None = None,
                batch_size: int = 256) -> list[str]:
        """The class the judge assigns to each decoded sample (images ``x_CHW``, volumes ``x_CDHW``,
        clouds ``xyz_N3``), as strings."""
        if not len(arrays):
            return []
        if self.format == "torchscript":
            return self._predict_torchscript(modality, arrays, image_size, batch_size)
        channels = self._sklearn_channels(modality, arrays, image_size)
        predicted: list[str] = []
        for lo in range(0, len(arrays), batch_size):
            x_NF = classifier_features(modality, arrays[lo:lo + batch_size], image_size=image_size, channels=channels)
            self._check_width(modality, x_NF.shape[1], image_size, arrays)
            predicted += [str(c) for c in self.model.predict(x_NF)]
        return predicted

    def _sklearn_channels(self, modality: str, arrays: Sequence[np.ndarray], image_size: int | None) -> int | None:
        """Grey or RGB: whichever of the two the fitted feature count matches (None: as the samples are)."""
        if modality != "image" or self.n_features is None:
            return None
        first = np.asarray(arrays[0])
        side = image_size or first.shape[-1]
        pixels = side * (image_size or first.shape[-2])
        if self.n_features == pixels:
            return 1
        if self.n_features == 3 * pixels:
            return 3
        return None   # _check_width explains

    def _check_width(self, modality: str, width: int, image_size: int | None, arrays: Sequence[np.ndarray]) -> None:
        if self.n_features is None or width == self.n_features:
            return
        if modality != "image":
            raise ClassifierError(f"the classifier takes {self.n_features} features; {modality} statistics "
                                  f"are {width}", fix=FIT_HINT)
        h, w = (image_size, image_size) if image_size else np.asarray(arrays[0]).shape[-2:]
        n = self.n_features
        grey, rgb = math.isqrt(n), math.isqrt(n // 3)
        side = grey if grey * grey == n else rgb if 3 * rgb * rgb == n else None
        channels = width // (h * w)
        raise ClassifierError(f"the classifier takes {n} features; {h} x {w} images with {channels} channel(s) "
                              f"give {width}",
                              fix=f"set classifier.image_size to {side}, the side it was fitted on" if side else FIT_HINT)

    def _predict_torchscript(self, modality: str, arrays: Sequence[np.ndarray], image_size: int | None,
                             batch_size: int) -> list[str]:
        import torch

        predicted: list[str] = []
        with torch.no_grad():
            for lo in range(0, len(arrays), batch_size):
                chunk = arrays[lo:lo + batch_size]
                if modality == "image":
                    x = torch.from_numpy(image_batch(chunk, image_size, self.channels))
                else:
                    x = torch.from_numpy(classifier_features(modality, chunk))
                try:
                    logits = self.model(x)
                except Exception as err:  # torch.jit.Error: a TorchScript trace whose last line is the cause
                    last_line = (str(err).strip().splitlines() or [type(err).__name__])[-1]
                    raise ClassifierError(f"the TorchScript classifier fails on inputs of shape {tuple(x.shape)} "
                                          f"({last_line[:200]})",
                                          fix="set classifier.image_size (and a `channels` attribute) to what it "
                                              "was trained on" if modality == "image" else FIT_HINT) from None
                if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != len(chunk):
                    shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
                    raise ClassifierError(f"the TorchScript classifier returned {shape}, not logits (N, K)",
                                          fix="export a module whose forward returns one row of class scores "
                                              "per input")
                if self.classes and logits.shape[1] != len(self.classes):
                    raise ClassifierError(f"the TorchScript classifier returns {logits.shape[1]} logits but its "
                                          f"classes attribute names {len(self.classes)}",
                                          fix="give one class name per logit")
                index = logits.argmax(dim=1).tolist()
                predicted += [self.classes[i] if self.classes else str(i) for i in index]
        return predicted


def _load_skops(data: bytes) -> Any:
    import skops.io as sio

    try:
        untrusted = sio.get_untrusted_types(data=data)
    except Exception as err:  # zipfile.BadZipFile, json errors: not a skops archive
        raise ClassifierError(f"the .skops file is not a skops archive ({type(err).__name__}: {err})",
                              fix="save the estimator with skops.io.dump(estimator, path)") from None
    foreign = [t for t in untrusted if t.split(".", 1)[0] not in TRUSTED_PACKAGES]
    if foreign:
        raise ClassifierError(f"the .skops file holds types outside {' and '.join(TRUSTED_PACKAGES)} "
                              f"({', '.join(foreign[:4])}), which are not loaded unchecked",
                              fix="save a scikit-learn estimator only; for other models export TorchScript (.pt)")
    try:
        return sio.loads(data, trusted=untrusted)
    except Exception as err:  # a skops archive written by an incompatible version
        raise ClassifierError(f"skops could not load the file ({type(err).__name__}: {err})",
                              fix="save it again with this environment's scikit-learn and skops") from None



def check_classes(labels: Sequence[str], classes: Sequence[str], whose: str) -> None:
    """Every label must be one of a judge's ``classes`` (its :attr:`Classifier.classes`; empty: a TorchScript
    judge that names none, which takes any index)."""
    unknown = sorted(set(labels) - set(classes)) if classes else []
    if unknown:
        shown = ", ".join(repr(c) for c in classes[:12]) + (", ..." if len(classes) > 12 else "")
        raise ClassifierError(f"class {unknown[0]!r} of the {whose} is not one the classifier knows ({shown})",
                              fix="fit the classifier on the labels the training data has (the tokenize "
                                  "stage's class folder names)")


def confusion_counts(requested: Sequence[str], predicted: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    """``counts_RP[i, j]``: samples requested as ``classes[i]`` and classified as ``classes[j]``."""
    at = {c: i for i, c in enumerate(classes)}
    counts_RP = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for r, p in zip(requested, predicted, strict=True):
        counts_RP[at[r], at[p]] += 1
    return counts_RP
