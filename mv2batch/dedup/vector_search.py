"""Cosine nearest neighbours: every vector's k nearest at or above a threshold, and the groups they join.

Vectors are L2-normalised here (whatever the run did), so an inner product is a cosine similarity. Up to a
size where it is still quick (N * N * D multiply-adds under EXACT_WORK) the search is exact: faiss.knn over
the matrix itself, a block of queries at a time, so no copy of the matrix is made and only a block's results
are held. Above that, a clustered self-join (IVF's idea, _clustered_join): similarities are still exact, only
which pairs are compared is approximate. Measured against faiss's own indexes on 2 shared cores: IndexIVFFlat
at the same lists and nprobe took about twice as long at 1M x 64 (100 s against 55 s) and missed a planted
pair; HNSW (M 16) took 44 s to build 100k x 512 alone. faiss and BLAS use the threads they are given
(OMP_NUM_THREADS, else every core).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

EXACT_WORK = 2.5e11  # N*N*D for the exact search: 22,000 x 512 takes ~5 s on 2 EPYC cores
QUERY_BLOCK = 8192  # queries per faiss call: results and distance tiles stay small
JOIN_QUERIES = 1024  # the clustered join's block: 1024 x 16384 similarities (64 MB) at a time
JOIN_CANDIDATES = 16384
TRAIN_PER_LIST = 20  # k-means samples per cluster: enough for roughly balanced clusters
DEFAULT_NPROBE = 16  # clusters each cluster is compared with (itself included): see inverted_lists


@dataclass
class Neighbours:
    """What the search found. Pairs are (first, second) row numbers, first the query, similarity >= threshold;
    a pair appears once per end that found the other (duplicates are harmless to grouping)."""

    first: np.ndarray  # int64
    second: np.ndarray  # int64
    similarity: np.ndarray  # float32
    nearest: np.ndarray  # (N,) float32: each vector's best similarity to another vector; nan if none found
    method: str  # "exact" or "clustered nlist=… nprobe=…"


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


def search_memory(n: int, d: int, nprobe: int = DEFAULT_NPROBE) -> int:
    """Bytes the search takes beside the matrix: the exact one, faiss's blocks of results; the clustered
    join, each vector's probed clusters and their sorting (20 bytes each), and one block of products."""
    if uses_exact(n, d):
        return QUERY_BLOCK * (1024 + 64) * 4  # faiss.knn's tiles of distances, and the block's results
    block = JOIN_QUERIES * JOIN_CANDIDATES * 4 + (JOIN_QUERIES + JOIN_CANDIDATES) * d * 4
    return n * (min(nprobe, inverted_lists(n)) * 20 + 16) + block


def inverted_lists(n: int) -> int:
    """The clustered join's cluster count: about 4 * sqrt(N) (faiss's IVF guidance is 4 to 16 * sqrt(N)),
    so that each vector is compared with about nprobe * sqrt(N) / 4 others; few clusters keep the k-means
    short on few cores, nprobe keeps recall (planted pairs at cosine 0.97: all found at nprobe 16)."""
    return max(1, min(n // TRAIN_PER_LIST, int(4 * math.sqrt(n))))


def find_neighbours(vectors: np.ndarray, threshold: float, k: int = 10, exact: bool | None = None,
                    nprobe: int = DEFAULT_NPROBE, seed: int = 0) -> Neighbours:
    """The k nearest neighbours of every row of a normalised float32 (N, D) matrix, kept where >= threshold.

    exact: None chooses by size (uses_exact); True / False force one search (tests, benchmarks).
    """
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    if n < 2:
        return _collect(n, [], "exact")
    if not (exact if exact is not None else uses_exact(n, d)):
        return _clustered_join(vectors, threshold, k, nprobe, seed)
    found = []
    for start in range(0, n, QUERY_BLOCK):
        similarities, labels = faiss.knn(vectors[start:start + QUERY_BLOCK], vectors, min(k + 1, n),
                                         metric=faiss.METRIC_INNER_PRODUCT)  # k + 1: each finds itself
        found.append(_block_pairs(start, similarities, labels, threshold))
    return _collect(n, found, "exact")


def _clustered_join(vectors: np.ndarray, threshold: float, k: int, nprobe: int, seed: int) -> Neighbours:
    """The approximate search, IVF's: vectors clustered (spherical k-means), each compared with the members
    of its nprobe nearest clusters. Done as a self-join, cluster by cluster: the vectors that probe a cluster
    against its members, a block at a time, by one BLAS product each, instead of faiss's per-query scan of
    inverted lists. A pair is found if either end probes the other's cluster.
    """
    n, d = vectors.shape
    centroids = _centroids(vectors, inverted_lists(n), seed)
    probes = min(nprobe, len(centroids))
    probed = _nearest_clusters(vectors, centroids, probes)  # (n, probes), nearest first: [:, 0] is home
    members_order = np.argsort(probed[:, 0], kind="stable")
    member_bounds = np.searchsorted(probed[:, 0][members_order], np.arange(len(centroids) + 1))
    probers_order = np.argsort(probed.reshape(-1), kind="stable")  # (vector, cluster) pairs by cluster
    prober_bounds = np.searchsorted(probed.reshape(-1)[probers_order], np.arange(len(centroids) + 1))
    probers_order //= probes  # pair -> its vector
    del probed
    nearest = np.full(n, -np.inf, np.float32)
    kept: list[tuple] = []
    held = 0
    for cluster in range(len(centroids)):
        members = members_order[member_bounds[cluster]:member_bounds[cluster + 1]]
        probers = probers_order[prober_bounds[cluster]:prober_bounds[cluster + 1]]
        for start in range(0, len(probers), JOIN_QUERIES):
            kept.append(_join_block(vectors, probers[start:start + JOIN_QUERIES], members, threshold, k, nearest))
            held += len(kept[-1][0])
        if held > 2 * k * n:  # a low threshold: keep each vector's k best so far, so memory stays bounded
            kept, held = [_at_most_k(*_joined(kept), k)], 0
    nearest[~np.isfinite(nearest)] = np.nan
    first, second, similarity = _at_most_k(*_joined(kept), k)
    return Neighbours(first, second, similarity, nearest, f"clustered nlist={len(centroids)} nprobe={probes}")


def _nearest_clusters(vectors: np.ndarray, centroids: np.ndarray, probes: int) -> np.ndarray:
    import faiss

    found = np.empty((len(vectors), probes), np.int32)
    for start in range(0, len(vectors), QUERY_BLOCK):
        found[start:start + QUERY_BLOCK] = faiss.knn(vectors[start:start + QUERY_BLOCK], centroids, probes,
                                                     metric=faiss.METRIC_INNER_PRODUCT)[1]
    return found


def _joined(parts: list[tuple]) -> tuple:
    parts = [(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)), *parts]
    return tuple(np.concatenate(column) for column in zip(*parts))


def _centroids(vectors: np.ndarray, nlist: int, seed: int) -> np.ndarray:
    """Spherical k-means centroids (normalised, as the vectors are), trained on a sample; 10 iterations: the
    clusters need only be roughly balanced, recall comes from nprobe."""
    import faiss

    n, d = vectors.shape
    sample = np.sort(np.random.default_rng(seed).choice(n, size=min(n, nlist * TRAIN_PER_LIST), replace=False))
    kmeans = faiss.Kmeans(d, nlist, niter=10, spherical=True, seed=seed, min_points_per_centroid=1)
    kmeans.train(vectors[sample])
    return kmeans.centroids


def _join_block(vectors: np.ndarray, queries: np.ndarray, members: np.ndarray, threshold: float, k: int,
                nearest: np.ndarray) -> tuple:
    """Pairs of a block of queries with a cluster's members, >= threshold, at most k per query; each query's
    best similarity into `nearest`. A query is kept from finding itself by row number, not by similarity (an
    identical copy is another item). Both are sorted: np.intersect1d finds the query among the members."""
    block = vectors[queries]
    pairs = []
    for start in range(0, len(members), JOIN_CANDIDATES):
        chosen = members[start:start + JOIN_CANDIDATES]
        similarities = block @ vectors[chosen].T
        _, rows, columns = np.intersect1d(queries, chosen, assume_unique=True, return_indices=True)
        similarities[rows, columns] = -np.inf
        nearest[queries] = np.maximum(nearest[queries], similarities.max(axis=1))
        rows, columns = np.nonzero(similarities >= threshold)
        pairs.append((queries[rows], chosen[columns], similarities[rows, columns]))
    return _at_most_k(*_joined(pairs), k)


def _at_most_k(first: np.ndarray, second: np.ndarray, similarity: np.ndarray, k: int) -> tuple:
    """Each query's k most similar pairs (as the exact search keeps its k nearest), where more pass."""
    if len(first) == 0 or np.bincount(first).max() <= k:
        return first, second, similarity
    order = np.lexsort((-similarity, first))
    first, second, similarity = first[order], second[order], similarity[order]
    starts = np.flatnonzero(np.r_[True, first[1:] != first[:-1]])
    rank = np.arange(len(first)) - np.repeat(starts, np.diff(np.r_[starts, len(first)]))
    return first[rank < k], second[rank < k], similarity[rank < k]


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
