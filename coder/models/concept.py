"""Concept branch of CODER (paper §3.2): the SCC basis Y from a GCN over the concept
graph, and Eq. 2, the learned query of Y by one modality's query feature."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _as_float64(x, name: str) -> Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.asarray(x))
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")
    return x.detach().to(torch.float64)


def normalized_adjacency(counts, cooccurrence) -> Tensor:
    """A_hat (g, g) float32 from caption counts (g,) and co-occurrence counts (g, g)
    (CVSE's "Complex" re-weighting, followed by CODER via [49]).

    A concept that occurs in no caption (count 0) gets P = 0 in its row instead of 0/0.
    """
    counts = _as_float64(counts, "counts")
    cooc = _as_float64(cooccurrence, "cooccurrence")
    g = counts.shape[0] if counts.ndim == 1 else -1
    if counts.ndim != 1 or cooc.shape != (g, g):
        raise ValueError(
            f"counts must be (g,) and cooccurrence (g, g); got {tuple(counts.shape)} and {tuple(cooc.shape)}"
        )
    if (counts < 0).any() or (cooc < 0).any():
        raise ValueError("counts and cooccurrence must be non-negative")
    cond = cooc / counts.clamp(min=1.0)[:, None]  # P(j|i)
    reweighted = 5.0 ** (cond - 0.02) - 5.0 ** (-0.02)
    binary = (reweighted >= 0.3).to(torch.float64)
    adj = 0.25 * binary / (binary.sum(0) + 1e-6) + torch.eye(g, dtype=torch.float64)  # A = B' + I
    d = adj.sum(1).pow(-0.5)  # rowsum(A) >= 1 thanks to the identity
    return (d[:, None] * adj.T * d[None, :]).to(torch.float32)  # D A^T D


class ConceptGCN(nn.Module):
    """Two bias-free graph convolutions d -> hidden -> F over fixed (X, A_hat); rows of the output,
    the SCC basis Y, are L2-normalised."""

    def __init__(self, word_vectors, adjacency, hidden: int = 512, out_dim: int = 1024,
                 negative_slope: float = 0.2) -> None:
        super().__init__()
        x = _as_float64(word_vectors, "word_vectors").to(torch.float32)
        a_hat = _as_float64(adjacency, "adjacency").to(torch.float32)
        if x.ndim != 2 or a_hat.shape != (x.shape[0], x.shape[0]):
            raise ValueError(
                f"word_vectors must be (g, d) and adjacency (g, g); got {tuple(x.shape)} and {tuple(a_hat.shape)}"
            )
        self.register_buffer("word_vectors", x)  # X: GloVe rows, fixed
        self.register_buffer("adjacency", a_hat)  # A_hat: fixed, not trained
        self.layer1 = nn.Linear(x.shape[1], hidden, bias=False)
        self.layer2 = nn.Linear(hidden, out_dim, bias=False)
        self.act = nn.LeakyReLU(negative_slope)

    def forward(self) -> Tensor:
        h = self.act(self.adjacency @ self.layer1(self.word_vectors))  # A_hat X W1
        y = self.adjacency @ self.layer2(h)  # A_hat H W2
        return F.normalize(y, dim=-1)


CONCEPT_ENCODERS = ("none", "cvse")
CONCEPT_SCORES = ("bilinear", "cvse")


class ConceptEncoder(nn.Module):
    """A concept-level feature encoder (§3.2, Fig. 2(b)) in CVSE's form: x -> tanh(BN(Linear(x))), F -> F.

    BatchNorm centres its input over the batch (the query batch, or the g rows of Y for the basis), so
    the common direction every query shares cannot decide the scores; tanh bounds each channel."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.bn = nn.BatchNorm1d(dim)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.bn(self.fc(x)))


class ConceptQuery(nn.Module):
    """Eq. 2 for one modality: a = softmax_i(lambda s(q, y_i)), v^C = L2norm(sum_i a_i y_i).

    encoder="none", score="bilinear" is Eq. 2 as printed, s = q^T W y_i. encoder="cvse" first passes the
    query and the basis through their own concept-level feature encoders (`ConceptEncoder`), for scoring
    only: v^C still combines the SCC rows y_i themselves. score="cvse" replaces the F x F matrix W by
    CVSE's scorer s = w^T (q' * y'_i) + b (a diagonal bilinear form plus a bias). With learn_smoothness,
    lambda is a trained scalar (kept as log lambda) starting from `smoothness`.
    """

    def __init__(self, dim: int = 1024, smoothness: float = 10.0, encoder: str = "none", score: str = "bilinear",
                 learn_smoothness: bool = False) -> None:
        super().__init__()
        if encoder not in CONCEPT_ENCODERS or score not in CONCEPT_SCORES:
            raise ValueError(f"encoder must be one of {CONCEPT_ENCODERS} and score one of {CONCEPT_SCORES}; "
                             f"got {encoder!r} and {score!r}")
        if smoothness <= 0:
            raise ValueError(f"smoothness (lambda) must be positive, got {smoothness}")
        self.dim, self.encoder, self.score = dim, encoder, score
        self.query_encoder = self.basis_encoder = None
        if encoder == "cvse":
            self.query_encoder, self.basis_encoder = ConceptEncoder(dim), ConceptEncoder(dim)
        if score == "bilinear":
            self.weight = nn.Parameter(torch.empty(dim, dim))  # W^v or W^w, F x F
            nn.init.xavier_uniform_(self.weight)
        else:
            self.scorer = nn.Linear(dim, 1)  # CVSE's fc3: w^T (q' * y') + b
        log_lambda = torch.tensor(float(np.log(smoothness)))
        if learn_smoothness:
            self.log_smoothness = nn.Parameter(log_lambda)
        else:
            self.register_buffer("log_smoothness", log_lambda)

    @property
    def smoothness(self) -> Tensor:
        """lambda of Eq. 2."""
        return self.log_smoothness.exp()

    def logits(self, q: Tensor, basis: Tensor) -> Tensor:
        """lambda s(q, y_i) for every query and concept: (B, g)."""
        if self.query_encoder is not None:
            q, basis = self.query_encoder(q), self.basis_encoder(basis)
        if self.score == "bilinear":
            scores = (q @ self.weight) @ basis.T  # q^T W y_i
        else:
            scores = (q[:, None, :] * basis[None, :, :]) @ self.scorer.weight[0] + self.scorer.bias
        return self.smoothness * scores

    def forward(self, q: Tensor, basis: Tensor, return_weights: bool = False):
        """q (B, F) query features, basis Y (g, F) -> v^C (B, F) [, weights a (B, g)]."""
        if q.ndim != 2 or basis.ndim != 2 or q.shape[1] != self.dim or basis.shape[1] != q.shape[1]:
            raise ValueError(
                f"ConceptQuery expects q (B, {self.dim}) and Y (g, {self.dim}); "
                f"got {tuple(q.shape)} and {tuple(basis.shape)}"
            )
        weights = torch.softmax(self.logits(q, basis), dim=-1)  # Eq. 2
        concept = F.normalize(weights @ basis, dim=-1)
        return (concept, weights) if return_weights else concept
