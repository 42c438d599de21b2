"""Which kept predictions an operator should review first: how uncertain each answer was, and a
pass that spreads the most uncertain out over the embedding space so that near-duplicates (the
same scene photographed twice, a burst of frames) do not fill the queue.

Pure arithmetic on numpy arrays; the service stores the inputs with each kept prediction
(:mod:`store.predictions`) and the admin API's review route puts them together.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: How many times ``limit`` of the least certain candidates the spreading pass chooses from: wide
#: enough to skip a cluster of near-duplicates, narrow enough that what it picks is still uncertain.
CANDIDATE_FACTOR = 4
#: Upper bound on the candidates the spreading pass compares (each step is O(candidates)).
MAX_CANDIDATES = 2000


def margin(probabilities: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 probability of each row of (N, C) probabilities: 0 is a tie between two
    labels, 1 is certain. A one-label model is always certain."""
    if probabilities.shape[1] < 2:
        return np.ones(len(probabilities), np.float32)
    top2 = -np.partition(-probabilities, 1, axis=1)[:, :2]
    return (top2[:, 0] - top2[:, 1]).astype(np.float32)


def normalised_entropy(probabilities: np.ndarray) -> np.ndarray:
    """Entropy of each row of (N, C) probabilities divided by log(C): 0 is certain, 1 is uniform,
    comparable between versions with different numbers of labels."""
    if probabilities.shape[1] < 2:
        return np.zeros(len(probabilities), np.float32)
    p = np.clip(probabilities.astype(np.float64), 1e-12, 1.0)
    return (-(p * np.log(p)).sum(axis=1) / np.log(probabilities.shape[1])).astype(np.float32)


def spread_out(embeddings: Sequence[np.ndarray | None], limit: int) -> list[int]:
    """Indices of at most ``limit`` items, chosen from ``embeddings`` (ordered least certain
    first) by a greedy farthest-point pass: the first item, then each time the item farthest (in
    cosine distance) from everything chosen so far. Returned in the input order, so the least
    certain still come first.

    An item without an embedding, or with one of another size (a version with another backbone),
    counts as far from everything: it is never mistaken for a duplicate.
    """
    count = len(embeddings)
    if limit <= 0 or count == 0:
        return []
    if count <= limit:
        return list(range(count))
    dims = [e.shape[0] for e in embeddings if e is not None]
    dim = max(set(dims), key=dims.count) if dims else 0
    comparable = np.array([e is not None and e.shape[0] == dim for e in embeddings])
    vectors = np.zeros((count, max(dim, 1)), np.float32)
    for i, vector in enumerate(embeddings):
        if comparable[i] and vector is not None:
            vectors[i] = vector / max(float(np.linalg.norm(vector)), 1e-12)
    # distance from each item to its nearest chosen one; 2 (the largest cosine distance) until
    # something comparable is chosen, so the incomparable are always "far"
    nearest = np.full(count, 2.0, np.float32)
    chosen = np.zeros(count, bool)
    picked: list[int] = []
    for _ in range(limit):
        # the first unchosen item among the farthest: ties go to the least certain
        candidates = np.where(chosen, -1.0, nearest)
        index = int(np.argmax(candidates))
        picked.append(index)
        chosen[index] = True
        if comparable[index]:
            distance = 1.0 - vectors @ vectors[index]
            nearest = np.where(comparable, np.minimum(nearest, distance), nearest)
    return sorted(picked)
