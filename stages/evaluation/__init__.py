"""Evaluation metrics for generators: plain numpy/scipy/torch, no Ray, no MLflow.

Images and video are compared in the feature space of a user-provided TorchScript
network (Inception for FID/KID/precision-recall, I3D for FVD)::

    extractor = FeatureExtractor.load("./inception.pt", kind="image", input_size=299)
    real_ND, fake_MD = extractor.features(real_NCHW), extractor.features(fake_NCHW)
    fid = frechet_from_features(real_ND, fake_MD)
    kid_mean, kid_std = kernel_inception_distance(real_ND, fake_MD)
    precision, recall = precision_recall(real_ND, fake_MD, k=3)

Point-cloud sets are compared cloud to cloud with Chamfer or Earth Mover's distance
(``mmd``, ``coverage``, ``one_nn_accuracy``); :func:`score_distributions` draws
per-sample scores for a report.

Class-conditional samples are judged by a classifier fitted on real data (the
Classification Accuracy Score, no pretrained weights)::

    judge = Classifier.load_bytes(data, "digits.skops")     # .skops or TorchScript .pt (pickles are refused)
    predicted = judge.predict("image", images_CHW, image_size=16)
    cas = mean(p == c for p, c in zip(predicted, requested_classes))

:func:`classifier_features` is what a scikit-learn judge is fitted on, per modality.

Prompted and controlled samples are checked without weights too (:mod:`.conditions`): measured attributes
(:data:`MEASURES`) compared over :func:`matched_pairs` of prompts ("a thick seven", "a thin seven"), and the
:func:`edge_agreement` of a sample's edges with its control map against another sample's
(:func:`other_controls`).

A sharded evaluation reduces each shard's features to :class:`Moments` (count, mean, centred scatter), which
merge exactly: FID/FVD of any number of samples from bounded memory.
"""

from __future__ import annotations

from .classifier import Classifier, ClassifierError, check_classes, classifier_features, confusion_counts
from .conditions import MEASURES, edge_agreement, matched_pairs, other_controls
from .features import FeatureExtractor
from .metrics import (
    chamfer_distance,
    coverage,
    earth_movers_distance,
    frechet_distance,
    frechet_from_features,
    gaussian_stats,
    kernel_inception_distance,
    mmd,
    one_nn_accuracy,
    pairwise_distances,
    precision_recall,
)
from .moments import Moments
from .plots import confusion_matrix, score_distributions

__all__ = [
    "MEASURES",
    "Classifier",
    "ClassifierError",
    "FeatureExtractor",
    "Moments",
    "check_classes",
    "classifier_features",
    "confusion_counts",
    "confusion_matrix",
    "chamfer_distance",
    "coverage",
    "earth_movers_distance",
    "edge_agreement",
    "frechet_distance",
    "frechet_from_features",
    "gaussian_stats",
    "kernel_inception_distance",
    "matched_pairs",
    "mmd",
    "one_nn_accuracy",
    "other_controls",
    "pairwise_distances",
    "precision_recall",
    "score_distributions",
]
