"""Plain NumPy reference implementations of every C kernel, in float64.

These are the test oracles: written for clarity, not speed. The C kernels must match them.
"""
import numpy as np

# ==== lowrank reference =====================================================================


def decompose_reference(W, gram=None, rank=1, method="eigh"):
    """Rank-``rank`` minimiser of ||(W - A B) X^T||_F with G = X^T X, in float64.

    method="eigh": A = top-r eigenvectors of W G W^T (numpy.linalg.eigh), B = A^T W, and the loss
    is the square root of the sum of the discarded eigenvalues (each clipped at 0).
    method="whitened": SVD-LLM's form: a factor L with L L^T = G (Cholesky, or the symmetric
    square root V sqrt(max(lambda, 0)) V^T when G is singular), SVD of W L, A = U_r,
    B = U_r^T W (never an inverse of L), loss = sqrt(sum of the discarded sigma^2).
    gram=None means G = I. Returns (A, B, loss), all float64.
    """
    w = np.asarray(W, dtype=np.float64)
    m, n = w.shape
    g = np.eye(n) if gram is None else np.asarray(gram, dtype=np.float64)
    if method == "eigh":
        values, vectors = np.linalg.eigh(w @ g @ w.T)
        order = np.argsort(values)[::-1]
        values, vectors = values[order], vectors[:, order]
        a = vectors[:, :rank]
        loss = float(np.sqrt(np.sum(np.clip(values[rank:], 0.0, None))))
    elif method == "whitened":
        try:
            factor = np.linalg.cholesky(g)
        except np.linalg.LinAlgError:
            lam, v = np.linalg.eigh(g)
            factor = (v * np.sqrt(np.clip(lam, 0.0, None))) @ v.T
        u, sigma, _ = np.linalg.svd(w @ factor, full_matrices=False)
        a = u[:, :rank]
        loss = float(np.sqrt(np.sum(sigma[rank:] ** 2)))
    else:
        raise ValueError(f"method must be 'eigh' or 'whitened', got {method!r}")
    return a, a.T @ w, loss


def allocate_ranks_reference(importance, shapes, avg_rank=None, keep_ratio=None, alpha=0.15, eps=1e-8):
    """MoE-I2 ranks, one unit at a time: floor of the shares, clamp to [1, cap], then +1 to the
    largest t_j - r_j below its cap (or -1 from the smallest above 1) until the sum is the budget
    round(R_avg * M); ties to the lower index."""
    imp = np.asarray(importance, dtype=np.float64)
    shapes = np.broadcast_to(np.asarray(shapes, dtype=np.int64), (imp.size, 2))
    count = imp.size
    caps = [max(1, int(m) * int(n) // (int(m) + int(n))) for m, n in shapes]
    if (avg_rank is None) == (keep_ratio is None):
        raise ValueError("give exactly one of avg_rank and keep_ratio")
    if avg_rank is None:
        avg_rank = keep_ratio * float(sum(int(m) * int(n) for m, n in shapes)) / float(sum(int(m) + int(n) for m, n in shapes))
    target = float(avg_rank) * count
    budget = int(np.floor(target + 0.5))
    if keep_ratio is not None and keep_ratio >= 1.0:
        budget = min(budget, sum(caps))
    if budget < count or budget > sum(caps):
        raise ValueError(f"budget {budget} outside [{count}, {sum(caps)}]")
    # Relative to the largest weight: the shares are unchanged, and this is how the C kernel
    # avoids overflow, so both floor the same float64 numbers.
    top = float(np.max(imp + eps))
    weights = [((x + eps) / top) ** alpha if top > 0 else 1.0 for x in imp]
    total = sum(weights)
    share = [wj / total * target for wj in weights]
    ranks = [min(max(int(np.floor(t)), 1), cap) for t, cap in zip(share, caps)]
    while sum(ranks) < budget:
        j = max((j for j in range(count) if ranks[j] < caps[j]), key=lambda j: (share[j] - ranks[j], -j))
        ranks[j] += 1
    while sum(ranks) > budget:
        j = min((j for j in range(count) if ranks[j] > 1), key=lambda j: (share[j] - ranks[j], j))
        ranks[j] -= 1
    return np.asarray(ranks, dtype=np.int64)


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


def route_rule_reference(router_logits, rule, dropped=None):
    """Routing under pruning for every rule of :class:`moei2.search.RoutingRule`, one token at a
    time, straight from the definitions (docs/method.md, "Routing rules"):

    weight score of a survivor j: softmax over the survivors' logits ("softmax"), sigmoid(z_j)
    ("sigmoid") or 1 ("unit"); choice key: z_j for softmax without a bias and for "unit", else
    weight score + choice_bias[j]. With num_groups > top_groups the experts form equal groups of
    consecutive indices; a group scores the sum of its two best surviving keys (-inf with fewer
    than two survivors) and groups are taken by score (ties to the lower group) until top_groups
    are taken and they hold at least top_k survivors. The token takes its top_k survivors in the
    taken groups by key (ties to the lower index); weights are divided by (their sum + norm_eps)
    if renormalize, then multiplied by scaling_factor. "sparsemixer": the survivors sorted by
    logit (ties to the lower index), the first k picked; pick i of logit m weighs scaling_factor /
    sum of exp(z_j - m) over the survivors from position i on whose gap (m - z_j) / max(|z_j|, m)
    is not above window. Returns (indices [N, k], weights [N, k])."""
    z = np.array(router_logits, dtype=np.float64)
    N, E = z.shape
    k = rule.top_k
    drop = np.zeros(E, dtype=bool) if dropped is None else np.asarray(dropped, dtype=bool)
    bias = None if rule.choice_bias is None else np.asarray(rule.choice_bias, dtype=np.float64)
    indices = np.zeros((N, k), dtype=np.int64)
    weights = np.zeros((N, k))
    for n in range(N):
        alive = [j for j in range(E) if not drop[j]]
        if rule.weights == "sparsemixer":
            ranked = sorted(alive, key=lambda j: (-z[n, j], j))
            for i in range(k):
                m = z[n, ranked[i]]
                mass = 0.0
                for j in ranked[i:]:
                    factor = max(abs(z[n, j]), m)
                    gap = (m - z[n, j]) / factor if factor != 0 else float("nan")
                    if not gap > rule.window:
                        mass += np.exp(z[n, j] - m)
                indices[n, i] = ranked[i]
                weights[n, i] = rule.scaling_factor / mass
            continue
        if rule.weights == "softmax":
            m = max(z[n, j] for j in alive)
            total = sum(np.exp(z[n, j] - m) for j in alive)
            score = {j: np.exp(z[n, j] - m) / total for j in alive}
        elif rule.weights == "sigmoid":
            score = {j: 1.0 / (1.0 + np.exp(-z[n, j])) for j in alive}
        else:
            score = {j: 1.0 for j in alive}
        if rule.weights == "unit" or (rule.weights == "softmax" and bias is None):
            key = {j: z[n, j] for j in alive}
        else:
            key = {j: score[j] + (0.0 if bias is None else bias[j]) for j in alive}
        eligible = alive
        if rule.num_groups > rule.top_groups:
            size = E // rule.num_groups
            members = [[j for j in alive if j // size == g] for g in range(rule.num_groups)]
            group_score = []
            for g in range(rule.num_groups):
                best = sorted((key[j] for j in members[g]), reverse=True)
                group_score.append(best[0] + best[1] if len(best) >= 2 else -np.inf)
            taken = []
            for g in sorted(range(rule.num_groups), key=lambda g: (-group_score[g], g)):
                if len(taken) >= rule.top_groups and sum(len(members[h]) for h in taken) >= k:
                    break
                taken.append(g)
            eligible = [j for j in alive if j // size in taken]
        chosen = sorted(eligible, key=lambda j: (-key[j], j))[:k]
        w = np.array([score[j] for j in chosen])
        if rule.renormalize:
            w = w / (w.sum() + rule.norm_eps)
        indices[n] = chosen
        weights[n] = rule.scaling_factor * w
    return indices, weights


def rule_loss_reference(router_logits, expert_outputs, rule, batch_sizes, mask):
    """L(S) under ``rule``, recomputing the routed outputs with and without the dropped experts
    from every expert's output on every token (expert_outputs [E, N, d])."""
    outputs = np.asarray(expert_outputs, dtype=np.float64)

    def routed(dropped):
        idx, w = route_rule_reference(router_logits, rule, dropped)
        return np.einsum("nk,nkd->nd", w, outputs[idx, np.arange(idx.shape[0])[:, None]])

    y, ys = routed(None), routed(np.asarray(mask, dtype=bool))
    loss, start = 0.0, 0
    for size in batch_sizes:
        loss += float(np.linalg.norm(y[start:start + size] - ys[start:start + size]))
        start += size
    return loss


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
