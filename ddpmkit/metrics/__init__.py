"""Measuring samples and models: the Frechet distance (FID with Inception, or the digits classifier's
features) and the variational bound in bits/dim.

Modules: ``frechet`` (the distance, running statistics), ``inception`` (the TorchScript network of FID),
``digits`` (a classifier of the 16x16 digits: features, confidence, coverage), ``fid`` (``evaluate_fid`` and
cached reference statistics), ``nll`` (the bound, ``evaluate_nll``). The arrows point one way:
fid -> inception, digits -> frechet.
"""

from .digits import DigitsClassifier, DigitsError, DigitsFeatures, DigitsNet
from .fid import evaluate_fid, reference_stats
from .frechet import FidError, RunningStats, feature_stats, frechet_distance, mean_cov
from .inception import (INCEPTION_FILENAME, INCEPTION_URL, InceptionFeatures, InceptionMissingError,
                        default_inception_path, download_inception, load_inception)
from .nll import bpd_terms, evaluate_nll, nll_bpd, prior_bpd, write_terms_csv

__all__ = [
    "frechet_distance", "mean_cov", "RunningStats", "feature_stats", "FidError",
    "INCEPTION_FILENAME", "INCEPTION_URL", "InceptionFeatures", "InceptionMissingError", "default_inception_path",
    "download_inception", "load_inception",
    "DigitsClassifier", "DigitsFeatures", "DigitsNet", "DigitsError",
    "evaluate_fid", "reference_stats",
    "bpd_terms", "nll_bpd", "prior_bpd", "write_terms_csv", "evaluate_nll",
]
