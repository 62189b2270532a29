"""Cosine nearest neighbours with faiss: every vector's k nearest, the pairs at or above a threshold.

Vectors are L2-normalised here (whatever the run did), so an inner product is a cosine similarity. Up to a
size where it is still quick (N * N * D multiply-adds under EXACT_WORK) the search is exact: faiss.knn over
the matrix itself, in blocks of queries, so no copy of the matrix and only a block's results are held. Above
that, an inverted-file index (IVF, flat lists: similarities are exact, only the candidates are approximate),
measured against HNSW in benchmarks/bench_dedup.py: on 2 cores HNSW's build alone at 1M x 512 took longer
than IVF's whole search. faiss uses the threads OpenMP gives it (OMP_NUM_THREADS, else every core).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

EXACT_WORK = 2.5e11  # N*N*D for the exact search: 22,000 x 512 takes ~5 s on 2 EPYC cores
QUERY_BLOCK = 8192  # queries per faiss call: results and distance tiles stay small
TRAIN_PER_LIST = 20  # k-means samples per list: enough for lists to be roughly balanced, half faiss's 39
DEFAULT_NPROBE = 16  # lists scanned per query: see inverted_lists


@dataclass
class Neighbours:
    """What the search found. Pairs are (first, second) row numbers, first the query, similarity >= threshold;
    a pair appears once per end that found the other (duplicates are harmless to grouping)."""

    first: np.ndarray  # int64
    second: np.ndarray  # int64
    similarity: np.ndarray  # float32
    nearest: np.ndarray  # (N,) float32: each vector's best similarity to another vector; nan if none found
    method: str  # "exact" or "ivf nlist=… nprobe=…"


def normalize_rows(matrix: np.ndarray) -> None:
    """L2-normalise a float32 matrix in place, a block at a time; a zero (or non-finite) row stays zero."""
    for start in range(0, len(matrix), QUERY_BLOCK):
        block = matrix[start:start + QUERY_BLOCK]
        np.nan_to_num(block, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
        norms = np.linalg.norm(block, axis=1, keepdims=True)
        np.divide(block, np.maximum(norms, 1e-12), out=block)


def uses_exact(n: int, d: int) -> bool:
    """Whether the exact search is quick enough for n vectors of d values."""
    return float(n) * n * d <= EXACT_WORK


def inverted_lists(n: int) -> int:
    """IVF's list count: about 4 * sqrt(N) (faiss's guidance is 4 to 16 * sqrt(N)); few lists keep the
    k-means training short on few cores, nprobe keeps recall."""
    return max(1, min(n // TRAIN_PER_LIST, int(4 * math.sqrt(n))))


def find_neighbours(vectors: np.ndarray, threshold: float, k: int = 10, exact: bool | None = None,
                    nprobe: int = DEFAULT_NPROBE, seed: int = 0) -> Neighbours:
    """The k nearest neighbours of every row of a normalised float32 (N, D) matrix, kept where >= threshold.

    exact: None chooses by size (uses_exact); True / False force one search (tests, benchmarks).
    """
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    wanted = min(k + 1, n)  # +1: a vector finds itself, and is dropped below
    if n < 2:
        return _collect(n, [], "exact")
    if exact if exact is not None else uses_exact(n, d):
        def search(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return faiss.knn(block, vectors, wanted, metric=faiss.METRIC_INNER_PRODUCT)
        method = "exact"
    else:
        index = _ivf_index(vectors, inverted_lists(n), seed)
        index.nprobe = min(nprobe, index.nlist)

        def search(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return index.search(block, wanted)
        method = f"ivf nlist={index.nlist} nprobe={index.nprobe}"
    found = [_block_pairs(start, *search(vectors[start:start + QUERY_BLOCK]), threshold)
             for start in range(0, n, QUERY_BLOCK)]
    return _collect(n, found, method)


def _ivf_index(vectors: np.ndarray, nlist: int, seed: int):
    """An IVF-flat inner-product index over the vectors, trained on a sample (spherical k-means: centroids
    normalised, as the vectors are). faiss.IndexIVFFlat keeps its own copy of the vectors (memory_needed)."""
    import faiss

    n, d = vectors.shape
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.spherical = True
    index.cp.niter = 10  # the lists need only be roughly balanced: recall comes from nprobe
    index.cp.min_points_per_centroid = 1  # the sample is sized here; no warning for it
    sample = min(n, nlist * TRAIN_PER_LIST)
    index.train(vectors[np.sort(np.random.default_rng(seed).choice(n, size=sample, replace=False))])
    for start in range(0, n, QUERY_BLOCK * 8):  # added in blocks: faiss's assignment buffers stay small
        index.add(vectors[start:start + QUERY_BLOCK * 8])
    return index


def _block_pairs(start: int, similarities: np.ndarray, labels: np.ndarray, threshold: float) -> tuple:
    """One block's results without each query itself: its pairs >= threshold and its best similarity.

    A vector is dropped from its own results by row number, not by rank: an identical copy may come first.
    """
    queries = np.arange(start, start + len(labels))[:, None]
    other = (labels != queries) & (labels >= 0)
    masked = np.where(other, similarities, -np.inf)
    nearest = masked.max(axis=1).astype(np.float32)
    nearest[~np.isfinite(nearest)] = np.nan
    keep = other & (similarities >= threshold)
    rows, columns = np.nonzero(keep)
    return (rows + start, labels[rows, columns], similarities[rows, columns].astype(np.float32), nearest)


def _collect(n: int, found: list[tuple], method: str) -> Neighbours:
    if not found:
        empty = np.zeros(0, np.int64)
        return Neighbours(empty, empty, np.zeros(0, np.float32), np.full(n, np.nan, np.float32), method)
    first, second, similarity, nearest = (np.concatenate(parts) for parts in zip(*found))
    return Neighbours(first.astype(np.int64), second.astype(np.int64), similarity, nearest, method)


def connected_groups(n: int, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Each of n items' group, named by its smallest member (union-find as min-label propagation with
    pointer jumping: vectorised, so millions of pairs take seconds, not a Python loop per pair)."""
    labels = np.arange(n, dtype=np.int64)
    if len(first) == 0:
        return labels
    first, second = np.asarray(first, np.int64), np.asarray(second, np.int64)
    while True:
        lowest = np.minimum(labels[first], labels[second])
        joined = labels.copy()
        np.minimum.at(joined, first, lowest)
        np.minimum.at(joined, second, lowest)
        while not np.array_equal(jumped := joined[joined], joined):  # every item to its label's label
            joined = jumped
        if np.array_equal(joined, labels):
            return labels
        labels = joined
