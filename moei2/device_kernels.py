"""The C core's dense kernels in torch, for any device: the whitened low-rank decomposition.

Where the C core computes in float64 this does too (torch.linalg on the tensors' device), with the
same maths as csrc/lowrank.c: the rank-r minimiser of ``||(W - A B) X^T||_F`` takes ``A`` = the
top-r eigenvectors of ``W G W^T`` (m <= n), or of ``R G R^T`` mapped back through ``Q`` for a tall
``W = Q R`` (m > n), ``B = A^T W``; the loss is the square root of the discarded eigenvalues
(each clipped at 0) summed smallest first. The tests hold it to the C kernel on the CPU: the same
ranks and losses, and factors equal to 1e-6 relative (up to the sign of each column, which no
eigensolver fixes).

Eigenvector signs are normalised here so that the largest-magnitude entry of each column of ``A``
is positive: runs on two devices then give the same factors, not only the same products.
"""
from __future__ import annotations

import torch

__all__ = ["decompose_torch"]


@torch.no_grad()
def decompose_torch(W: torch.Tensor, gram, rank: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Rank-``rank`` factors ``(A [m, r], B [r, n], info)`` of ``W`` [m, n] on W's device.

    gram: ``X^T X`` [n, n] (float64 preferred; converted) or None for the plain truncated SVD.
    A and B come back in W's dtype (float32 for narrower weights); ``info`` holds ``loss``,
    ``energy`` (``||W X^T||_F``) and ``route`` (``left-gram`` or ``qr``) as the C kernel reports them.
    """
    m, n = W.shape
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must be in [1, {min(m, n)}] for W of shape {tuple(W.shape)}, got {rank}")
    w = W.detach().to(torch.float64)
    g = None if gram is None else torch.as_tensor(gram).to(device=w.device, dtype=torch.float64)
    if m <= n:
        route, left = "left-gram", w
        q = None
    else:
        route = "qr"
        q, left = torch.linalg.qr(w, mode="reduced")
    reduced = left @ left.T if g is None else left @ g @ left.T
    reduced = (reduced + reduced.T) * 0.5  # exact symmetry: the eigensolver reads one triangle anyway
    values, vectors = torch.linalg.eigh(reduced)
    values, vectors = values.flip(0), vectors.flip(1)
    a = vectors[:, :rank]
    if q is not None:
        a = q @ a
    # Signs: largest-magnitude entry of each column positive.
    pivot = a.abs().argmax(dim=0)
    signs = torch.sign(a[pivot, torch.arange(rank, device=a.device)])
    a = a * torch.where(signs == 0, torch.ones_like(signs), signs)
    discarded = values[rank:].clamp_min(0.0).flip(0)  # smallest first, as the C kernel sums them
    loss = float(torch.sqrt(discarded.sum()))
    energy = float(torch.sqrt(values.clamp_min(0.0).flip(0).sum()))
    out_dtype = W.dtype if W.dtype == torch.float64 else torch.float32
    A = a.to(out_dtype)
    # B = A^T W from the returned A, as the C kernel does (its rounding is that of the result).
    B = A.T @ W.detach().to(out_dtype)
    return A, B, {"loss": loss, "energy": energy, "route": route, "rank": int(rank), "fallback": ""}
