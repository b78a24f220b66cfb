"""Flat-parameter models batched over a rank's nodes.

Parameters of the L local nodes are one `(L, d)` array X. Data come either per node,
`A` of shape (L, B, f) with targets (L, B) and sample weights (L, B) summing to 1 per
node, or shared by all nodes, `A` of shape (B, f) (evaluation). Every function is
vectorised over the node axis; there is no Python loop over nodes.

Losses are the weighted mean per node plus l2/2 * ||x||^2 (all parameters, biases
included). Hessian-vector products are exact for the quadratic, logistic and softmax
models; for the MLP they are the central difference of gradients
(g(x + eps v) - g(x - eps v)) / (2 eps) with eps = 1e-3 * (1 + ||x||) / ||v|| per node,
whose error is O(eps^2) in exact arithmetic and about 1e-4 relative in float32.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np


def _xp(a):
    if isinstance(a, np.ndarray):
        return np
    import cupy
    return cupy


def _matmul_T(A, D):
    """A^T D per node: A (L,B,f) or (B,f), D (L,B,k) -> (L,f,k)."""
    xp = _xp(D)
    At = xp.swapaxes(A, -1, -2)
    return xp.matmul(At, D)


class LinearModel:
    """Linear predictor z = A W + b with one of three losses.

    kind = "quadratic": least squares 1/2 (z - y)^2, no bias (f parameters);
    kind = "logistic": binary cross-entropy with labels in {0, 1} (f + 1 parameters);
    kind = "softmax": multinomial cross-entropy over C classes ((f + 1) C parameters).
    """

    def __init__(self, kind: str, features: int, classes: int = 0, l2: float = 0.0):
        self.kind = kind
        self.f = features
        self.k = classes if kind == "softmax" else 1
        self.bias = kind != "quadratic"
        self.l2 = l2
        self.d = self.f * self.k + (self.k if self.bias else 0)

    def init(self, seed: int) -> np.ndarray:
        return np.zeros(self.d, np.float32)

    def _split(self, X):
        L = X.shape[0]
        W = X[:, : self.f * self.k].reshape(L, self.f, self.k)
        b = X[:, self.f * self.k:] if self.bias else None
        return W, b

    def logits(self, X, A):
        xp = _xp(X)
        W, b = self._split(X)
        Z = xp.matmul(A, W)
        if b is not None:
            Z += b[:, None, :]  # in place: the same sums as Z + b, one array fewer
        return Z

    def _dloss(self, Z, y, w) -> Tuple:
        """Per-node weighted loss and dLoss/dZ."""
        xp = _xp(Z)
        if self.kind == "quadratic":
            r = Z[..., 0] - y
            return (w * r * r).sum(axis=-1) * 0.5, (w * r)[..., None]
        if self.kind == "logistic":
            # the same float32 operations as softplus = max(z, 0) + log1p(e), p = where(z >= 0,
            # 1, e) / (1 + e) with e = exp(-|z|), loss = sum w (softplus - y z), dZ = w (p - y),
            # evaluated in place in four scratch arrays (the step is call-bound at small sizes)
            z = Z[..., 0]
            y = y.astype(z.dtype, copy=False)  # integer labels would promote to float64
            e = xp.abs(z)
            xp.negative(e, out=e)
            xp.exp(e, out=e)  # one exponential for both, stable for any z
            sp = xp.maximum(z, 0)
            t = xp.log1p(e)
            sp += t
            p = xp.where(z >= 0, z.dtype.type(1), e)
            xp.add(e, 1, out=t)
            p /= t
            xp.multiply(y, z, out=t)
            sp -= t
            sp *= w
            p -= y
            p *= w
            return sp.sum(axis=-1), p[..., None]
        zmax = Z.max(axis=-1, keepdims=True)
        e = xp.exp(Z - zmax)
        s = e.sum(axis=-1, keepdims=True)
        lse = (xp.log(s) + zmax)[..., 0]
        zy = xp.take_along_axis(Z, y[..., None].astype(np.int64), axis=-1)[..., 0]
        P = e / s
        onehot = xp.zeros_like(P)
        xp.put_along_axis(onehot, y[..., None].astype(np.int64), 1, axis=-1)
        return (w * (lse - zy)).sum(axis=-1), w[..., None] * (P - onehot)

    def _pack(self, X, A, dZ):
        xp = _xp(X)
        L = X.shape[0]
        G = xp.empty((L, self.d), dtype=X.dtype)
        if self.bias:
            G[:, : self.f * self.k] = _matmul_T(A, dZ).reshape(L, -1)
        else:  # the weights are all of G: write the product in place
            xp.matmul(xp.swapaxes(A, -1, -2), dZ, out=G.reshape(L, self.f, self.k))
        if self.bias:
            G[:, self.f * self.k:] = dZ.sum(axis=1)
        if self.l2:
            G += self.l2 * X
        return G

    def _loss_dz(self, X, A, y, w):
        """Per-node loss (+ L2) and dLoss/dZ; shared data (A 2-D) serves every node."""
        Z = self.logits(X, A)
        if A.ndim == 2:
            y = _xp(X).broadcast_to(y, Z.shape[:2])
        loss, dZ = self._dloss(Z, y, w)
        if self.l2:
            loss = loss + 0.5 * self.l2 * (X * X).sum(axis=1)
        return loss, dZ

    def loss_grad(self, X, A, y, w):
        loss, dZ = self._loss_dz(X, A, y, w)
        return loss, self._pack(X, A, dZ)

    EVAL_CHUNK = 1 << 24  # shared-data evaluation: at most this many (node, sample) logits at once

    def _chunks(self, X, A):
        """Node slices for evaluating many nodes on shared data (A 2-D) in bounded memory;
        every node's result is independent of the others, so chunking changes no bit."""
        L = X.shape[0]
        step = L if A.ndim != 2 else max(1, self.EVAL_CHUNK // max(1, A.shape[0] * self.k))
        return [slice(i, min(L, i + step)) for i in range(0, L, step)] if L > step else None

    def loss(self, X, A, y, w):
        chunks = self._chunks(X, A)
        if chunks is not None:
            return _xp(X).concatenate([self._loss_dz(X[c], A, y, w[c])[0] for c in chunks])
        return self._loss_dz(X, A, y, w)[0]

    def accuracy(self, X, A, y):
        xp = _xp(X)
        chunks = self._chunks(X, A)
        if chunks is not None:
            return xp.concatenate([self.accuracy(X[c], A, y) for c in chunks])
        Z = self.logits(X, A)
        if self.kind == "quadratic":
            return xp.full(X.shape[0], np.nan, dtype=X.dtype)
        pred = (Z[..., 0] > 0).astype(np.int64) if self.kind == "logistic" else Z.argmax(axis=-1)
        return (pred == y).mean(axis=-1)

    def hvp(self, X, V, A, y, w):
        """Exact Hessian-vector products, one per node."""
        xp = _xp(X)
        Z = self.logits(X, A)
        Wv, bv = self._split(V)
        Zv = xp.matmul(A, Wv)
        if bv is not None:
            Zv = Zv + bv[:, None, :]
        if self.kind == "quadratic":
            dZv = w[..., None] * Zv
        elif self.kind == "logistic":
            e = xp.exp(-xp.abs(Z))
            p = xp.where(Z >= 0, 1, e) / (1 + e)
            dZv = w[..., None] * p * (1 - p) * Zv
        else:
            P = xp.exp(Z - Z.max(axis=-1, keepdims=True))
            P /= P.sum(axis=-1, keepdims=True)
            dZv = w[..., None] * (P * Zv - P * (P * Zv).sum(axis=-1, keepdims=True))
        return self._pack(V, A, dZv)  # _pack adds l2 * V: the Hessian of the L2 term


class MLP:
    """Multi-layer perceptron with softmax cross-entropy; hidden activation relu or tanh.

    Parameters per node: for each layer (W: in x out, then b: out), flattened in order.
    Initialisation: Glorot uniform times `init_scale`, biases 0, same for all nodes.
    """

    def __init__(self, features: int, hidden: Sequence[int], classes: int, activation: str = "tanh",
                 l2: float = 0.0, init_scale: float = 1.0):
        self.sizes: List[int] = [features, *hidden, classes]
        self.activation = activation
        self.l2 = l2
        self.init_scale = init_scale
        self.shapes = []
        off = 0
        for a, b in zip(self.sizes[:-1], self.sizes[1:]):
            self.shapes.append((off, a, b))
            off += a * b + b
        self.d = off
        self.kind = "mlp"

    def init(self, seed: int) -> np.ndarray:
        rng = np.random.default_rng([seed, 3])
        x = np.zeros(self.d, np.float32)
        for off, a, b in self.shapes:
            lim = self.init_scale * np.sqrt(6.0 / (a + b))
            x[off: off + a * b] = rng.uniform(-lim, lim, a * b)
        return x

    def _layers(self, X):
        L = X.shape[0]
        return [(X[:, off: off + a * b].reshape(L, a, b), X[:, off + a * b: off + a * b + b])
                for off, a, b in self.shapes]

    def _act(self, Z):
        xp = _xp(Z)
        return xp.tanh(Z) if self.activation == "tanh" else xp.maximum(Z, 0)

    def _dact(self, Z, H):
        return (1 - H * H) if self.activation == "tanh" else (Z > 0).astype(Z.dtype)

    def _forward(self, X, A):
        xp = _xp(X)
        H, Zs, Hs = A, [], [A]
        layers = self._layers(X)
        for i, (W, b) in enumerate(layers):
            Z = xp.matmul(H, W) + b[:, None, :]
            Zs.append(Z)
            H = self._act(Z) if i < len(layers) - 1 else Z
            Hs.append(H)
        return Zs, Hs

    def _head(self, Z, y, w):
        xp = _xp(Z)
        zmax = Z.max(axis=-1, keepdims=True)
        e = xp.exp(Z - zmax)
        s = e.sum(axis=-1, keepdims=True)
        lse = (xp.log(s) + zmax)[..., 0]
        yy = y[..., None].astype(np.int64)
        zy = xp.take_along_axis(Z, yy, axis=-1)[..., 0]
        D = e / s
        onehot = xp.zeros_like(D)
        xp.put_along_axis(onehot, yy, 1, axis=-1)
        return (w * (lse - zy)).sum(axis=-1), w[..., None] * (D - onehot)

    def loss_grad(self, X, A, y, w):
        xp = _xp(X)
        Zs, Hs = self._forward(X, A)
        if A.ndim == 2:
            y = xp.broadcast_to(y, Zs[-1].shape[:2])
        loss, D = self._head(Zs[-1], y, w)
        G = xp.empty(X.shape, dtype=X.dtype)
        L = X.shape[0]
        layers = self._layers(X)
        for i in range(len(layers) - 1, -1, -1):
            off, a, b = self.shapes[i]
            G[:, off: off + a * b] = _matmul_T(Hs[i], D).reshape(L, -1)
            G[:, off + a * b: off + a * b + b] = D.sum(axis=1)
            if i:
                D = xp.matmul(D, xp.swapaxes(layers[i][0], -1, -2)) * self._dact(Zs[i - 1], Hs[i])
        if self.l2:
            loss = loss + 0.5 * self.l2 * (X * X).sum(axis=1)
            G += self.l2 * X
        return loss, G

    def loss(self, X, A, y, w):
        Zs, _ = self._forward(X, A)
        if A.ndim == 2:
            y = _xp(X).broadcast_to(y, Zs[-1].shape[:2])
        loss, _ = self._head(Zs[-1], y, w)
        if self.l2:
            loss = loss + 0.5 * self.l2 * (X * X).sum(axis=1)
        return loss

    def accuracy(self, X, A, y):
        Zs, _ = self._forward(X, A)
        return (Zs[-1].argmax(axis=-1) == y).mean(axis=-1)

    def hvp(self, X, V, A, y, w):
        xp = _xp(X)
        vn = xp.sqrt((V * V).sum(axis=1, keepdims=True))
        xn = xp.sqrt((X * X).sum(axis=1, keepdims=True))
        eps = 1e-3 * (1 + xn) / xp.maximum(vn, 1e-30)
        _, gp = self.loss_grad(X + eps * V, A, y, w)
        _, gm = self.loss_grad(X - eps * V, A, y, w)
        return (gp - gm) / (2 * eps)


def least_squares_optimum(ds, parts, l2: float = 0.0) -> np.ndarray:
    """Minimiser of (1/n) sum_v mean_{i in v} 1/2 (a_i . x - b_i)^2 + l2/2 ||x||^2 (float64)."""
    f = ds.features
    H = l2 * np.eye(f)
    r = np.zeros(f)
    for idx in parts:
        A = ds.X_train[idx].astype(np.float64)
        H += A.T @ A / len(idx) / len(parts)
        r += A.T @ ds.y_train[idx].astype(np.float64) / len(idx) / len(parts)
    return np.linalg.solve(H, r)
