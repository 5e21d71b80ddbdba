"""Metrics of the ADM evaluator (openai/guided-diffusion ``evaluations/evaluator.py``) in numpy float64.

- :class:`FeatureStats`: count, sum and sum of outer products of features in float64. Statistics of
  parts merge by addition (what torchmetrics keeps per rank), so workers can reduce partial sums;
  mean = s / n and covariance = (S - n mu mu^T) / (n - 1) (np.cov's unbiased estimate).
- :func:`frechet_distance`: scipy ``sqrtm`` of sigma1 sigma2, with ADM's 1e-6 diagonal fallback when
  the root is not finite and its check that the imaginary part is negligible.
- :func:`inception_score`: exp(E KL(p(y|x) || p(y))) over 10 contiguous splits (ADM: splits of 5,000 of 50,000).
- :func:`precision_recall`: k=3 nearest-neighbour manifolds (Kynkäänniemi et al., ADM's ManifoldEstimator).
- :func:`load_reference_npz`: mu / sigma (and images or features) of an ADM reference batch.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
import warnings
import zipfile

import numpy as np
import scipy.linalg
import torch

from nextscale import storage
from nextscale.errors import NotFound
from nextscale.images import InputError

log = logging.getLogger(__name__)


class FeatureStats:
    """Mergeable float64 first and second moments of (N, D) features."""

    CHUNK = 1024  # rows per partial sum of :meth:`in_chunks`

    def __init__(self, dim: int):
        self.n = 0
        self.sum = np.zeros(dim, dtype=np.float64)
        self.outer = np.zeros((dim, dim), dtype=np.float64)

    @classmethod
    def of(cls, features_ND: np.ndarray) -> FeatureStats:
        stats = cls(features_ND.shape[1])
        stats.update(features_ND)
        return stats

    @classmethod
    def in_chunks(cls, features_ND: np.ndarray) -> FeatureStats:
        """Partial sums over fixed chunks merged in index order: the same bits whoever computed the rows."""
        stats = cls(features_ND.shape[1])
        for begin in range(0, len(features_ND), cls.CHUNK):
            stats.merge(cls.of(features_ND[begin:begin + cls.CHUNK]))
        return stats

    def update(self, features_ND: np.ndarray) -> FeatureStats:
        x = np.asarray(features_ND, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.sum.shape[0]:
            raise ValueError(f"features must be (N, {self.sum.shape[0]}), got {x.shape}")
        self.n += x.shape[0]
        self.sum += x.sum(axis=0)
        self.outer += x.T @ x
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        if other.sum.shape != self.sum.shape:
            raise ValueError(f"cannot merge statistics of {other.sum.shape[0]}-d and {self.sum.shape[0]}-d features")
        self.n += other.n
        self.sum += other.sum
        self.outer += other.outer
        return self

    @property
    def mu(self) -> np.ndarray:
        return self.sum / self.n

    @property
    def sigma(self) -> np.ndarray:
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 features, got {self.n}")
        mu = self.mu
        return (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)

    @property
    def digest(self) -> str:
        """A short hash of the float64 sums: equal across runs exactly when the features are."""
        return hashlib.sha256(self.sum.tobytes() + self.outer.tobytes()).hexdigest()[:16]


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), exactly as the ADM evaluator."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                         f"{sigma2.shape} (were both computed with the same feature extractor?)")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates",
                      stacklevel=2)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))} in the Frechet distance's sqrtm")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


class SplitScores:
    """The Inception Score's sums over ``splits`` contiguous splits of N logits, fed in index order a batch at a time:
    per split the count, sum of p(y|x) and sum of sum_y p log p, so that no split's logits are ever held.
    Splits are ``np.array_split``'s; exp(E KL(p(y|x) || p(y))) = exp(mean sum_y p log p - sum_y p(y) log p(y))."""

    def __init__(self, n: int, splits: int = 10):
        self.ends = np.cumsum([len(a) for a in np.array_split(np.arange(n), splits)])
        self.count = np.zeros(len(self.ends), dtype=np.int64)
        self.p_sum: np.ndarray | None = None
        self.plogp_sum = np.zeros(len(self.ends), dtype=np.float64)
        self.seen = 0

    def update(self, logits_NK: np.ndarray) -> SplitScores:
        logp = np.asarray(logits_NK, dtype=np.float64)
        logp = logp - logp.max(axis=1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
        p = np.exp(logp)
        if self.p_sum is None:
            self.p_sum = np.zeros((len(self.ends), p.shape[1]), dtype=np.float64)
        split = np.searchsorted(self.ends, self.seen + np.arange(len(p)), side="right")
        for s in np.unique(split):
            rows = split == s
            self.count[s] += rows.sum()
            self.p_sum[s] += p[rows].sum(axis=0)
            self.plogp_sum[s] += (p[rows] * logp[rows]).sum()
        self.seen += len(p)
        return self

    def score(self) -> tuple[float, float]:
        """(mean, std) over the non-empty splits."""
        scores = []
        for s in np.flatnonzero(self.count):
            p_y = self.p_sum[s] / self.count[s]
            scores.append(np.exp(self.plogp_sum[s] / self.count[s] - np.sum(p_y * np.log(p_y))))
        return float(np.mean(scores)), float(np.std(scores))


def inception_score(logits_NK: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """(mean, std) over ``splits`` contiguous splits of exp(mean KL(p(y|x) || p(y))); p = softmax(logits)."""
    return SplitScores(len(logits_NK), splits).update(logits_NK).score()


def _sq_distances(a_ND: torch.Tensor, b_MD: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (N, M) as ADM computes them: |a|^2 + |b|^2 - 2 a.b, clamped at 0."""
    d = a_ND.square().sum(1, keepdim=True) + b_MD.square().sum(1)[None] - 2 * a_ND @ b_MD.T
    return d.clamp_(min=0)


def manifold_radii(features_ND: np.ndarray, k: int = 3, block: int = 10_000) -> np.ndarray:
    """Squared distance of every feature to its k-th nearest neighbour within the set (self excluded)."""
    x = torch.from_numpy(np.asarray(features_ND, dtype=np.float32))
    if len(x) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} features per set, got {len(x)}")
    radii = []
    for begin in range(0, len(x), block):
        d = _sq_distances(x[begin:begin + block], x)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # the 0-th neighbour is the point itself
    return torch.cat(radii).numpy()


def precision_recall(ref_ND: np.ndarray, sample_MD: np.ndarray, k: int = 3, block: int = 10_000) -> tuple[float, float]:
    """(precision, recall): share of samples inside the reference manifold, and of references inside the samples'.

    A point is inside a manifold if it lies within the k-NN radius of any of its points (ADM evaluator).
    """
    ref, sam = (torch.from_numpy(np.asarray(a, dtype=np.float32)) for a in (ref_ND, sample_MD))
    r_ref = torch.from_numpy(manifold_radii(ref_ND, k, block))
    r_sam = torch.from_numpy(manifold_radii(sample_MD, k, block))
    sam_in = torch.zeros(len(sam), dtype=torch.bool)
    ref_in = torch.zeros(len(ref), dtype=torch.bool)
    for i in range(0, len(ref), block):
        for j in range(0, len(sam), block):
            d = _sq_distances(ref[i:i + block], sam[j:j + block])
            sam_in[j:j + block] |= (d <= r_ref[i:i + block, None]).any(0)
            ref_in[i:i + block] |= (d <= r_sam[None, j:j + block]).any(1)
    return float(sam_in.double().mean()), float(ref_in.double().mean())


def load_reference_npz(url: str) -> dict[str, np.ndarray]:
    """The arrays of a reference .npz: ADM batches hold mu, sigma and arr_0 (uint8 N x H x W x 3 images);
    nextscale's reference_stats.npz holds mu, sigma and features (pool features for precision/recall).
    """
    try:
        data = storage.read_bytes(url)
    except FileNotFoundError:
        raise NotFound(
            f"reference {url} does not exist: download VIRTUAL_imagenet256_labeled.npz from the ADM evaluator "
            "(openai/guided-diffusion evaluations/README.md) or set reference.images to a folder of real images"
        ) from None
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            out = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise InputError(f"reference {url} is not a readable .npz ({e})") from e
    missing = [k for k in ("mu", "sigma") if k not in out]
    if missing:
        raise InputError(f"reference {url} has no {missing[0]!r} array (keys: {sorted(out)}); use an ADM reference "
                         "batch or a reference_stats.npz written by `nextscale fid`")
    return out


def write_sample_npz(url: str, images_NHWC: np.ndarray, labels_N: np.ndarray) -> None:
    """ADM-evaluator sample batch: ``arr_0`` uint8 (N, H, W, 3) plus ``labels`` int64 (N,), written atomically."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "samples.npz")
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, arr in (("arr_0", images_NHWC), ("labels", labels_N)):
                with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
        fs, dest = storage.filesystem(url)
        if storage.is_remote(url):
            fs.put_file(path, dest)  # the object appears when the upload completes
        else:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            tmp_dest = f"{dest}.tmp-{os.getpid()}"
            fs.put_file(path, tmp_dest)
            os.replace(tmp_dest, dest)
