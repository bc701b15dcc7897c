"""Plain NumPy reference implementations of every C kernel, in float64.

These are the test oracles: written for clarity, not speed. The C kernels must match them.
"""
import numpy as np

# ==== lowrank reference =====================================================================


# ==== end lowrank reference =================================================================



# ==== search reference ======================================================================

def route_reference(router_logits, top_k, renormalize, scaling_factor=1.0, dropped=None):
    """Routing under pruning, one token at a time: dropped experts' logits become -inf, softmax over
    the rest, top-k by probability (ties to the lower index), optional division by the sum of the
    k probabilities, then the scaling factor. Returns (indices [N, k], weights [N, k])."""
    z = np.array(router_logits, dtype=np.float64)
    N, E = z.shape
    drop = set() if dropped is None else {int(j) for j in np.flatnonzero(dropped)} if np.asarray(dropped).dtype == bool \
        else {int(j) for j in dropped}
    indices = np.zeros((N, top_k), dtype=np.int64)
    weights = np.zeros((N, top_k))
    for n in range(N):
        alive = [j for j in range(E) if j not in drop]
        m = max(z[n, j] for j in alive)
        e = {j: np.exp(z[n, j] - m) for j in alive}
        total = sum(e.values())
        p = {j: e[j] / total for j in alive}
        order = sorted(alive, key=lambda j: (-z[n, j], j))[:top_k]
        w = np.array([p[j] for j in order])
        if renormalize:
            w = w / w.sum()
        indices[n] = order
        weights[n] = scaling_factor * w
    return indices, weights


def routed_output_reference(router_logits, expert_outputs, top_k, renormalize, scaling_factor=1.0, dropped=None):
    """The routed part of the MoE output, sum_q w_q * o_{expert_q}(x), from every expert's output
    on every token (expert_outputs [E, N, d])."""
    idx, w = route_reference(router_logits, top_k, renormalize, scaling_factor, dropped)
    outputs = np.asarray(expert_outputs, dtype=np.float64)
    N = idx.shape[0]
    y = np.zeros((N, outputs.shape[2]))
    for n in range(N):
        for q in range(top_k):
            y[n] += w[n, q] * outputs[idx[n, q], n]
    return y


def layer_loss_reference(router_logits, expert_outputs, top_k, renormalize, scaling_factor, batch_sizes, mask):
    """L(S) = sum over calibration batches of ||Y_b - Y_b,S||_F, recomputing both outputs."""
    y = routed_output_reference(router_logits, expert_outputs, top_k, renormalize, scaling_factor)
    ys = routed_output_reference(router_logits, expert_outputs, top_k, renormalize, scaling_factor,
                                 np.asarray(mask, dtype=bool))
    loss, start = 0.0, 0
    for size in batch_sizes:
        loss += float(np.linalg.norm(y[start:start + size] - ys[start:start + size]))
        start += size
    return loss


def expert_outputs_reference(x, gate_up_proj, down_proj):
    """Every expert's SiLU-gated output on every token, [E, N, H], in float64."""
    x = np.asarray(x, dtype=np.float64)
    gu = np.asarray(gate_up_proj, dtype=np.float64)
    down = np.asarray(down_proj, dtype=np.float64)
    inter = gu.shape[1] // 2
    out = []
    for j in range(gu.shape[0]):
        h = x @ gu[j].T
        gate, up = h[:, :inter], h[:, inter:]
        out.append((gate / (1.0 + np.exp(-gate)) * up) @ down[j].T)
    return np.stack(out)


def exhaustive_reference(loss_of_mask, num_experts, r):
    """Every r-subset in itertools.combinations order with its loss: [(loss, dropped tuple)]."""
    import itertools

    results = []
    for combo in itertools.combinations(range(num_experts), r):
        mask = np.zeros(num_experts, dtype=bool)
        mask[list(combo)] = True
        results.append((loss_of_mask(mask), combo))
    return results



# ==== end search reference ==================================================================
