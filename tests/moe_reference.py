"""Float64 NumPy statement of the routing rule, independent of the transformers modules under test."""
from __future__ import annotations

import numpy as np


def silu(x):
    return x / (1.0 + np.exp(-x))


def dense_experts(view):
    """[(gate, up, down)] float64 arrays of every expert of a layer."""
    return [tuple(w.double().numpy() for w in view.expert(j)) for j in range(view.num_experts)]


def route(x, router_weight, top_k, renormalize, scaling, dropped=()):
    """Top-k experts and weights: dropped logits -> -inf, softmax, top-k, renormalise if asked, scale."""
    logits = x @ router_weight.T
    logits[:, list(dropped)] = -np.inf
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    top = np.argsort(-p, axis=1, kind="stable")[:, :top_k]
    w = np.take_along_axis(p, top, axis=1)
    if renormalize:
        w = w / w.sum(axis=1, keepdims=True)
    return top, w * scaling


def routed_output(x, router_weight, experts, top_k, renormalize, scaling, dropped=()):
    """sum_j w_j down_j(silu(gate_j x) * up_j x) over each token's chosen experts."""
    x = np.asarray(x, dtype=np.float64)
    top, w = route(x, np.asarray(router_weight, dtype=np.float64), top_k, renormalize, scaling, dropped)
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for slot in range(top_k):
            gate, up, down = experts[top[t, slot]]
            out[t] += w[t, slot] * (down @ (silu(gate @ x[t]) * (up @ x[t])))
    return out
