"""Frozen-feature classifiers that say how good an embedding is: cosine k-NN and a linear probe.

Both are the standard self-supervised evaluations (k-NN as in InstDisc/DINO, majority vote over
the k most similar training samples; the linear probe a multinomial logistic regression), run
the same way on learned features and on raw pixels so the two can be compared.
"""

from __future__ import annotations

import numpy as np


def knn_predict(train: np.ndarray, train_labels: np.ndarray, query: np.ndarray, k: int = 20) -> np.ndarray:
    """Cosine k-NN: majority vote of the k nearest training rows; ties go to the higher similarity sum."""
    import faiss

    from prune.cluster.kmeans import l2_normalize

    train_n, query_n = l2_normalize(np.ascontiguousarray(train, np.float32)), l2_normalize(np.ascontiguousarray(query, np.float32))
    index = faiss.IndexFlatIP(train_n.shape[1])
    index.add(train_n)
    sims, idx = index.search(query_n, k)
    labels = train_labels[idx]  # [n_query, k]
    n_classes = int(train_labels.max()) + 1
    votes = np.zeros((len(query), n_classes))
    weight = np.zeros((len(query), n_classes))
    rows = np.repeat(np.arange(len(query)), k)
    np.add.at(votes, (rows, labels.ravel()), 1.0)
    np.add.at(weight, (rows, labels.ravel()), sims.ravel())
    return np.argmax(votes + 1e-6 * weight, axis=1)  # the sum of k sims < k: it only breaks ties


def linear_probe(train: np.ndarray, train_labels: np.ndarray, query: np.ndarray, weight_decay: float = 1e-4,
                 max_iter: int = 300, n_classes: int | None = None, standardize: bool = True) -> np.ndarray:
    """Multinomial logistic regression, full-batch L-BFGS from zero weights; predicted labels.

    Deterministic (no sampling) and solved to convergence, so a subset's score depends on the
    subset, not on a learning rate or an epoch count. `standardize` scales features by the
    training rows' statistics; pass False when they are already standardized.
    """
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.array(train, np.float32))  # a copy: inputs may be read-only (Ray's object store)
    q = torch.from_numpy(np.array(query, np.float32))
    if standardize:
        mu, sd = x.mean(0), x.std(0) + 1e-6
        x, q = (x - mu) / sd, (q - mu) / sd
    y = torch.from_numpy(np.asarray(train_labels, np.int64))
    n_classes = n_classes or int(y.max()) + 1
    w = torch.zeros(x.shape[1], n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + weight_decay * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (q @ w + b).argmax(1).numpy()


def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.asarray(pred) == np.asarray(labels)))
