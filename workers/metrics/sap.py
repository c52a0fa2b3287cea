"""Separated Attribute Predictability (Kumar et al. 2018), as disentanglement_lib computes it for discrete factors.

For every (code dimension i, factor k): the test accuracy of a classifier that predicts v_k from code_i alone,
fitted on the training codes. disentanglement_lib's classifier is ``LinearSVC(C=0.01, class_weight="balanced")``
on the raw code value, i.e. one-vs-rest thresholds along one axis; it is kept here so scores compare with
published ones. A factor with many values is hard for it (a threshold isolates the end values only), so SAP on
dSprites is small even for a good code. SAP = mean over factors of (best - second-best accuracy).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.svm import LinearSVC

from workers.data.base import DataError, ImageDataset
from workers.metrics.sampling import FactorSampler, Representation, train_test_arrays


def sap_score_matrix(
    train_codes: np.ndarray, train_factors: np.ndarray, test_codes: np.ndarray, test_factors: np.ndarray
) -> np.ndarray:
    """(D, K) test accuracies of one-dimensional classifiers; factors constant in the training set are NaN."""
    train_codes, train_factors, test_codes, test_factors = train_test_arrays(
        "SAP", train_codes, train_factors, test_codes, test_factors
    )
    num_codes, num_factors = train_codes.shape[1], train_factors.shape[1]
    scores = np.full((num_codes, num_factors), np.nan)
    for k in range(num_factors):
        if np.unique(train_factors[:, k]).size < 2:
            continue
        for i in range(num_codes):
            classifier = LinearSVC(C=0.01, class_weight="balanced")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                classifier.fit(train_codes[:, i : i + 1], train_factors[:, k])
            scores[i, k] = np.mean(classifier.predict(test_codes[:, i : i + 1]) == test_factors[:, k])
    return scores


def sap_from_codes(
    train_codes: np.ndarray, train_factors: np.ndarray, test_codes: np.ndarray, test_factors: np.ndarray
) -> float:
    """SAP of codes (N, D) against discrete factors (N, K); training set to fit, test set to score."""
    scores = sap_score_matrix(train_codes, train_factors, test_codes, test_factors)
    scores = scores[:, ~np.isnan(scores).any(axis=0)]
    if scores.shape[1] == 0:
        raise DataError("SAP: every factor takes a single value in the training sample; there is nothing to measure")
    ranked = np.sort(scores, axis=0)[::-1]
    second = ranked[1] if ranked.shape[0] > 1 else np.zeros_like(ranked[0])
    return float(np.mean(ranked[0] - second))


def sap(
    representation: Representation,
    dataset: ImageDataset,
    num_train: int,
    num_test: int,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
) -> float:
    """SAP on fresh ground-truth draws: ``num_train`` to fit the classifiers, ``num_test`` to score them."""
    sampler = FactorSampler(dataset, generator, "SAP")
    return sap_from_codes(*sampler.train_test_codes(representation, num_train, num_test, batch_size))
