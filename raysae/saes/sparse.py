"""Sparse kernels for the TopK family: decode and encoder backward touch only the active latents.

With k of n latents active, a dense decode `latents @ W_dec` spends n/k of its work on zeros,
and so does the dense backward of the encoder (the gradient of the pre-activations is zero
outside the top k). These functions do the same math on the (indices, values) pairs only.
Reference-equivalence tests hold them equal to the dense versions (tests/test_sparse.py).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


class SparseLatents(NamedTuple):
    """The active latents of a batch as coordinate lists, the TopK family's natural output.

    Entry j is latent `cols[j]` of token `rows[j]` with activation `values[j]` (detached); no
    (row, col) pair appears twice, and every pair not listed is 0. A listed value may itself be
    0 (a top-k pre-activation that the ReLU clipped): such an entry did not fire. Training reads
    the fired flags and the sparsity metrics from here, so no (B, n_latents) tensor is built;
    `dense()` builds it for callers that want one.
    """

    rows: Tensor
    """(nnz,) int64 token of each entry, in 0..n_rows−1."""
    cols: Tensor
    """(nnz,) int64 latent of each entry, in 0..n_latents−1."""
    values: Tensor
    """(nnz,) activation of each entry."""
    n_rows: int
    """Tokens in the batch (B)."""
    n_latents: int
    """Latents of the SAE (n)."""

    @classmethod
    def from_topk(cls, indices: Tensor, values: Tensor, n_latents: int) -> SparseLatents:
        """From per-token top-k (indices, values), each (B, k)."""
        b, k = indices.shape
        rows = torch.arange(b, device=indices.device).repeat_interleave(k)
        return cls(rows, indices.reshape(-1), values.detach().reshape(-1), b, n_latents)

    def detached(self) -> SparseLatents:
        """The same entries with `values` detached (what SAEOutput holds)."""
        return self._replace(values=self.values.detach())

    def dense(self) -> Tensor:
        """(n_rows, n_latents) latents, zeros outside the listed entries."""
        out = torch.zeros(
            self.n_rows, self.n_latents, dtype=self.values.dtype, device=self.values.device
        )
        return out.index_put_((self.rows, self.cols), self.values)

    def fired(self) -> Tensor:
        """(n_latents,) bool: latent i has an entry > 0, the dense rule `latents.amax(0) > 0`."""
        top = torch.zeros(self.n_latents, dtype=self.values.dtype, device=self.values.device)
        return top.scatter_reduce_(0, self.cols, self.values, "amax") > 0


def sparse_decode(indices: Tensor, values: Tensor, W_dec: Tensor) -> Tensor:
    """Σ_j values[b, j] · W_dec[indices[b, j]] for each token b, without materialising zeros.

    indices, values: (B, k); W_dec: (n_latents, d_in) → (B, d_in). Differentiable in values and W_dec.
    """
    return F.embedding_bag(indices, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum")


def ragged_decode(rows: Tensor, cols: Tensor, values: Tensor, W_dec: Tensor, n_rows: int) -> Tensor:
    """Decode a varying number of active latents per token (BatchTopK, thresholded inference).

    rows, cols, values: (nnz,), rows sorted ascending (as `nonzero()` returns them); W_dec:
    (n_latents, d_in) → (n_rows, d_in).
    """
    counts = torch.bincount(rows, minlength=n_rows)
    offsets = torch.zeros(n_rows, dtype=torch.long, device=rows.device)
    offsets[1:] = torch.cumsum(counts, 0)[:-1]
    return F.embedding_bag(
        cols, W_dec, offsets, per_sample_weights=values.to(W_dec.dtype), mode="sum"
    )


_SCRATCH: dict[tuple, Tensor] = {}
"""The last CPU (B, n_latents) pre-activation buffer, by (shape, dtype): see _pre_activations."""


def _pre_activations(x: Tensor, W_enc: Tensor, b_enc: Tensor) -> Tensor:
    """x W_encᵀ + b_enc. On the CPU (no autocast) into one buffer reused while the shape stays
    the same: a fresh (B, n) result costs its page faults on every step (a (4096, 4608) fp32
    buffer, 75 MB, took 28–35 ms to first touch here against a 170–260 ms GEMM; the CUDA
    caching allocator has no such cost). The buffer is overwritten by the next call of that
    shape: callers use the pre-activations within their own step (AuxK) and do not keep them."""
    if x.device.type != "cpu" or torch.is_autocast_enabled("cpu") or x.dtype != W_enc.dtype:
        return F.linear(x, W_enc, b_enc)
    key = ((x.shape[0], W_enc.shape[0]), x.dtype)
    buffer = _SCRATCH.get(key)
    if buffer is None:
        _SCRATCH.clear()  # one buffer at most: a new shape (last batch, eval chunks) replaces it
        buffer = _SCRATCH[key] = torch.empty(key[0], dtype=x.dtype)
    return torch.addmm(b_enc, x, W_enc.t(), out=buffer)


_TOPK_GROUP = 16
"""Elements per group of `row_topk`'s first pass (the fastest of 4-64 at all three sizes measured)."""


def row_topk(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """`pre.topk(k, dim=-1, sorted=False)` for (B, n) pre-activations, in two small top-ks.

    Column j's group is {j, j + m, j + 2m, …} (m = n / 16, so each group max is a max over
    rows of a (16, m) view: contiguous, vectorised). The maxima of the k groups with the largest
    maxima are k values in those groups that are at least as large as every value outside them,
    so the top k of those groups' k·16 values are the top k of the row: the values torch.topk
    returns, ties included (which of several equal values is picked may differ, as it may
    between torch versions). On the CPU, where torch.topk spends ~3 ns per element, this took
    30 → 23 ms at (4096, 4608), k=32; 50 → 31 ms at (2048, 16384), k=64; 31 → 12 ms at
    (256, 131072), k=64 (2 threads). Elsewhere, or when n does not split into at least 4k
    groups, it is torch.topk itself.
    """
    B, n = pre.shape
    m = n // _TOPK_GROUP
    if pre.device.type != "cpu" or n % _TOPK_GROUP or m < 4 * k:
        return pre.topk(k, dim=-1, sorted=False)
    groups = pre.reshape(B, _TOPK_GROUP, m)
    _, best = groups.amax(1).topk(k, dim=-1, sorted=False)  # (B, k) group ids
    candidates = groups.gather(2, best.unsqueeze(1).expand(B, _TOPK_GROUP, k))
    values, j = candidates.reshape(B, _TOPK_GROUP * k).topk(k, dim=-1, sorted=False)
    # Candidate j is element j // k of group best[j % k], i.e. column (j // k)·m + best[j % k].
    return values, torch.div(j, k, rounding_mode="floor") * m + best.gather(1, j % k)


class _TopKEncode(torch.autograd.Function):
    """relu(topk((x − centre) W_encᵀ + b_enc)) with a backward that only visits the k chosen
    latents."""

    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, centre: Optional[Tensor]):
        # Unused outputs get None, not a dense zero gradient, in backward.
        ctx.set_materialize_grads(False)
        x = x if centre is None else x - centre
        pre = _pre_activations(x, W_enc, b_enc)
        values, indices = row_topk(pre, k)
        values = values.relu()
        ctx.save_for_backward(x, W_enc, indices, values)
        ctx.mark_non_differentiable(indices)
        # Under torch.autocast the GEMM above ran in its low-precision dtype; the backward runs
        # under the same autocast (as torch.amp.custom_bwd does, which needs the device type
        # fixed when the function is defined), so AuxK's dense backward GEMMs do too.
        device = x.device.type
        ctx.autocast = (
            torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        )
        return values, indices, pre

    @staticmethod
    def backward(ctx, grad_values: Tensor, _grad_indices, grad_pre: Tensor):
        device = ctx.saved_tensors[0].device.type
        with torch.autocast(device, dtype=ctx.autocast, enabled=ctx.autocast is not None):
            return _TopKEncode._backward(ctx, grad_values, grad_pre)

    @staticmethod
    def _backward(ctx, grad_values: Optional[Tensor], grad_pre: Optional[Tensor]):
        x, W_enc, indices, values = ctx.saved_tensors  # x is the centred input
        need_x, _, _, _, need_centre = ctx.needs_input_grad
        if grad_values is None:
            grad_values = torch.zeros_like(values)
        # relu'; in x's dtype, so the sparse products below (which autocast does not cover)
        # take matching operands when the values came out of an autocast GEMM in bfloat16.
        g = (grad_values * (values > 0)).to(x.dtype)
        flat_idx = indices.reshape(-1)
        # dL/dW_enc[i] = Σ_{(b, j): indices[b, j] = i} g[b, j] · x[b]  — a sparse (n × B) @ (B × d).
        B, k = indices.shape
        batch_idx = torch.arange(B, device=x.device).repeat_interleave(k)
        coo = torch.sparse_coo_tensor(
            torch.stack([flat_idx, batch_idx]),
            g.reshape(-1),
            (W_enc.shape[0], B),
            check_invariants=False,
        )
        # Into a zeroed gradient in place: torch.sparse.mm(coo, x) holds a zero (n, d) matrix
        # besides its result, one more weight-sized temporary (1.1 GiB at n=131072, d=2304).
        grad_W = torch.zeros(W_enc.shape, dtype=x.dtype, device=x.device).addmm_(coo, x)
        grad_b = torch.zeros(W_enc.shape[0], dtype=g.dtype, device=g.device)
        grad_b.index_add_(0, flat_idx, g.reshape(-1))
        if grad_pre is not None:  # callers that also use the dense pre-activations (AuxK)
            grad_W += grad_pre.t() @ x
            grad_b = grad_b + grad_pre.sum(0)
        grad_x = grad_centre = None
        if need_x:
            # dL/dx = Σ_j g[b, j] · W_enc[indices[b, j]]  — the same gather-sum as the decoder.
            grad_x = sparse_decode(indices, g, W_enc)
            if grad_pre is not None:
                grad_x = grad_x + grad_pre @ W_enc
        if need_centre:
            # −Σ_b dL/dx[b] = −Σ_i (Σ of g at latent i) · W_enc[i] = −dL/db_enc · W_enc: one (n,)
            # × (n, d) product instead of the (B, d) input gradient summed over the batch (the
            # same sum, reordered; it was a (B·k)-row embedding bag, 6.6 ms at B=4096, k=32).
            with torch.autocast(x.device.type, enabled=False):
                grad_centre = -(grad_b.to(W_enc.dtype) @ W_enc)
        return grad_x, grad_W, grad_b, None, grad_centre


def topk_encode(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, centre: Optional[Tensor] = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k pre-activations of x − centre per token, ReLU'd, with a sparse backward.

    x: (B, d_in); W_enc: (n, d_in); b_enc: (n,); centre: (d_in,) or None (no centring) →
    values (B, k) ≥ 0, indices (B, k), pre (B, n). `pre` (the dense pre-activations) is returned
    for the AuxK loss; gradients through it are dense. Giving the centre (an SAE's b_dec) here
    rather than passing x − b_dec lets the backward form b_dec's gradient without the input
    gradient when x (the data) needs none.
    """
    return _TopKEncode.apply(x, W_enc, b_enc, k, centre)


def dense_topk_encode(x: Tensor, W_enc: Tensor, b_enc: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Plain-autograd reference for `topk_encode` (tests and benchmarks only)."""
    pre = F.linear(x, W_enc, b_enc)
    values, indices = pre.topk(k, dim=-1, sorted=False)
    return values.relu(), indices
