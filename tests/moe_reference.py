"""Float64 NumPy statement of the routing rule, independent of the transformers modules under test."""
from __future__ import annotations

import numpy as np


def silu(x):
    return x / (1.0 + np.exp(-x))


def clamped_swiglu(alpha, limit):
    """gpt-oss's gated activation: (clip(up, -L, L) + 1) * g * sigmoid(alpha g), g = min(gate, L)."""
    def glu(gate, up):
        gate = np.minimum(gate, limit)
        return (np.clip(up, -limit, limit) + 1.0) * gate / (1.0 + np.exp(-alpha * gate))
    return glu


def dense_experts(view):
    """[(gate, up, down, biases or None)] float64 arrays of every expert of a layer."""
    out = []
    for j in range(view.num_experts):
        biases = view.expert_biases(j)
        out.append((*(w.double().numpy() for w in view.expert(j)),
                    None if biases is None else tuple(b.double().numpy() for b in biases)))
    return out


def rule_extras(view):
    """The router bias and gated activation of the families that have them (gpt-oss), for routed_output."""
    bias = getattr(view.adapter.router_linear(view.router), "bias", None)
    experts = view.experts_module
    glu = clamped_swiglu(experts.alpha, experts.limit) if hasattr(experts, "limit") else None
    return {"router_bias": None if bias is None else bias.detach().double().numpy().copy(), "glu": glu}


def route(x, router_weight, top_k, renormalize, scaling, dropped=(), router_bias=None):
    """Top-k experts and weights: dropped logits -> -inf, softmax, top-k, renormalise if asked, scale."""
    logits = x @ router_weight.T
    if router_bias is not None:
        logits = logits + router_bias
    logits[:, list(dropped)] = -np.inf
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    top = np.argsort(-p, axis=1, kind="stable")[:, :top_k]
    w = np.take_along_axis(p, top, axis=1)
    if renormalize:
        w = w / w.sum(axis=1, keepdims=True)
    return top, w * scaling


def routed_output(x, router_weight, experts, top_k, renormalize, scaling, dropped=(), router_bias=None, glu=None):
    """sum_j w_j down_j(silu(gate_j x) * up_j x) over each token's chosen experts (with the experts'
    biases where given, and ``glu(gate, up)`` in place of ``silu(gate) * up`` where given)."""
    x = np.asarray(x, dtype=np.float64)
    top, w = route(x, np.asarray(router_weight, dtype=np.float64), top_k, renormalize, scaling, dropped, router_bias)
    glu = glu or (lambda gate, up: silu(gate) * up)
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for slot in range(top_k):
            gate, up, down, *rest = experts[top[t, slot]]
            biases = rest[0] if rest and rest[0] is not None else (0.0, 0.0, 0.0)
            out[t] += w[t, slot] * (down @ glu(gate @ x[t] + biases[0], up @ x[t] + biases[1]) + biases[2])
    return out
