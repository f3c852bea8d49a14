"""Whether samples follow their condition, measured without network weights: prompted attributes and control maps.

Attributes: a prompt that asks for ``word`` ("a thick seven") is matched with the same prompt asking for its
``opposite`` ("a thin seven"); the j-th sample of the one pairs with the j-th sample of the other, and a
measure of the images (:data:`MEASURES`) says in which share of the pairs the ``word`` sample has more of it.
Noise scores about 0.5, a model that ignores the word too::

    pairs = matched_pairs(captions, "thick", "thin")
    amount = np.asarray([ink(x) for x in images_CHW])
    share = np.mean([amount[a] > amount[b] for a, b in pairs])

Control maps: :func:`edge_agreement` correlates a sample's edge map with its control map, both blurred and
both taken from the controls' mean map (so that the blob every digit's edges share does not count); the
baseline is the same against another sample's control map (:func:`other_controls`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Sequence

import numpy as np

from .classifier import LUMINANCE


def _luma(x_CHW: np.ndarray) -> np.ndarray:
    x = np.asarray(x_CHW, dtype=np.float64)
    if x.ndim == 2:
        return x
    return x[0] if x.shape[0] == 1 else np.tensordot(np.asarray(LUMINANCE), x[:3], axes=1)


def ink(x_CHW: np.ndarray) -> float:
    """Total intensity of an image in [0, 1] (its luma): stroke area times darkness."""
    return float(_luma(x_CHW).sum())


def slant(x_CHW: np.ndarray) -> float:
    """``|mu11 / mu02|`` of the image's intensity moments: how far the stroke moves sideways per row."""
    m_HW = _luma(x_CHW) + 1e-9   # a blank image has no slant, not 0/0
    y_HW, x_HW = np.mgrid[0:m_HW.shape[0], 0:m_HW.shape[1]].astype(np.float64)
    total = m_HW.sum()
    dx_HW, dy_HW = x_HW - (m_HW * x_HW).sum() / total, y_HW - (m_HW * y_HW).sum() / total
    return float(abs((m_HW * dx_HW * dy_HW).sum() / (m_HW * dy_HW * dy_HW).sum()))


#: measured attributes of an image ``x_CHW`` in [0, 1], by the name ``prompt_attributes`` gives them
MEASURES: dict[str, Callable[[np.ndarray], float]] = {"ink": ink, "slant": slant}


def _normal(text: str) -> str:
    return " ".join(text.lower().split())


def _word(word: str) -> re.Pattern[str]:
    """``word`` as a whole word (not part of a longer one), any case."""
    return re.compile(rf"(?<![\w']){re.escape(_normal(word))}(?![\w'])")


def counterpart(prompt: str, word: str, opposite: str) -> str | None:
    """The prompt with ``word`` replaced by ``opposite`` (whole words, lower case, spaces collapsed); None
    when it does not have ``word``."""
    text = _normal(prompt)
    pattern = _word(word)
    return pattern.sub(_normal(opposite), text) if pattern.search(text) else None


def matched_pairs(captions: Sequence[str | None], word: str, opposite: str) -> list[tuple[int, int]]:
    """``(i, j)`` pairs of sample positions: ``captions[i]`` has ``word``, ``captions[j]`` is the same prompt
    with ``opposite``; the k-th sample of a prompt pairs with the k-th of its counterpart (positions in
    order). Every pair once, from its ``word`` side; prompts compare in lower case with spaces collapsed."""
    by_prompt: dict[str, list[int]] = {}
    for i, caption in enumerate(captions):
        if caption:
            by_prompt.setdefault(_normal(caption), []).append(i)
    pairs: list[tuple[int, int]] = []
    for prompt, at in by_prompt.items():
        other = counterpart(prompt, word, opposite)
        if other is not None and other != prompt and other in by_prompt:
            pairs += zip(at, by_prompt[other])   # the shorter run of samples decides how many pairs
    return sorted(pairs)


def edge_agreement(edges: Sequence[np.ndarray], controls: Sequence[np.ndarray], *,
                   mean_of: Sequence[np.ndarray] | None = None, sigma: float = 1.0) -> np.ndarray:
    """Per pair, the correlation of a sample's edge map with a control map (each ``x_CHW``, their first
    channel), both blurred (Gaussian, ``sigma``: a one-pixel shift still agrees) and both taken from the
    mean blurred map of ``mean_of`` (default: ``controls``). 1: the same map; 0: nothing beyond the mean map
    in common (also for a map equal to the mean)."""
    from scipy.ndimage import gaussian_filter

    def blurred(maps: Sequence[np.ndarray]) -> np.ndarray:
        return np.stack([gaussian_filter(np.asarray(x, dtype=np.float64)[0], sigma) for x in maps])

    a_BHW, b_BHW = blurred(edges), blurred(controls)
    if a_BHW.shape != b_BHW.shape:
        raise ValueError(f"edge maps {a_BHW.shape} and control maps {b_BHW.shape} differ in number or size")
    mean_HW = (b_BHW if mean_of is None else blurred(mean_of)).mean(0)
    a_BP, b_BP = (a_BHW - mean_HW).reshape(len(a_BHW), -1), (b_BHW - mean_HW).reshape(len(b_BHW), -1)
    norms_B = np.linalg.norm(a_BP, axis=1) * np.linalg.norm(b_BP, axis=1)
    return (a_BP * b_BP).sum(1) / np.maximum(norms_B, 1e-12)


def other_controls(controls: Sequence[Hashable]) -> list[int] | None:
    """For each sample, the position of a sample drawn under another control map: the first sample of the
    next distinct map (in order of first appearance, the last one's next is the first). A control map drawn
    for several samples in a row (``samples_per_control``) is never its own baseline. None with fewer than
    two distinct maps."""
    first: dict[Hashable, int] = {}
    for i, control in enumerate(controls):
        first.setdefault(control, i)
    if len(first) < 2:
        return None
    order = list(first)
    following = {c: first[order[(k + 1) % len(order)]] for k, c in enumerate(order)}
    return [following[c] for c in controls]
