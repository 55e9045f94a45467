"""Fast paths equal plain paths: sparse decode and the sparse TopK encoder backward."""

import torch

from raysae.saes.sparse import dense_topk_encode, ragged_decode, sparse_decode, topk_encode


def test_sparse_decode_equals_dense(seeded):
    B, n, d, k = 16, 64, 12, 5
    W = torch.randn(n, d, requires_grad=True)
    idx = torch.stack([torch.randperm(n)[:k] for _ in range(B)])
    vals = torch.rand(B, k, requires_grad=True)
    dense_latents = torch.zeros(B, n).scatter(1, idx, vals)
    out_sparse = sparse_decode(idx, vals, W)
    out_dense = dense_latents @ W
    torch.testing.assert_close(out_sparse, out_dense)
    g = torch.randn(B, d)
    grads_sparse = torch.autograd.grad(out_sparse, (W, vals), g)
    grads_dense = torch.autograd.grad(out_dense, (W, vals), g)
    for a, b in zip(grads_sparse, grads_dense):
        torch.testing.assert_close(a, b)


def test_ragged_decode_equals_dense(seeded):
    B, n, d = 10, 40, 7
    latents = torch.rand(B, n) * (torch.rand(B, n) < 0.1)
    latents[3] = 0  # a token with nothing active
    W = torch.randn(n, d)
    rows, cols = latents.nonzero(as_tuple=True)
    out = ragged_decode(rows, cols, latents[rows, cols], W, B)
    torch.testing.assert_close(out, latents @ W)


def test_topk_encode_backward_equals_dense_autograd(seeded):
    B, n, d, k = 32, 96, 16, 6
    x = torch.randn(B, d, requires_grad=True)
    W = torch.randn(n, d, requires_grad=True)
    b = torch.randn(n, requires_grad=True)
    vals, idx, _ = topk_encode(x, W, b, k)
    ref_vals, ref_idx = dense_topk_encode(x, W, b, k)
    # Same selection (compare as sets per row, order is unspecified).
    assert torch.equal(idx.sort(-1).values, ref_idx.sort(-1).values)
    g = torch.randn(B, k)
    # Align the upstream gradient to each path's own ordering of the selected latents.
    order = idx.argsort(-1)
    ref_order = ref_idx.argsort(-1)
    g_sorted = torch.randn(B, k)
    g_fast = torch.empty_like(g).scatter_(1, order, g_sorted)
    g_ref = torch.empty_like(g).scatter_(1, ref_order, g_sorted)
    fast = torch.autograd.grad(vals, (x, W, b), g_fast)
    ref = torch.autograd.grad(ref_vals, (x, W, b), g_ref)
    for a, r in zip(fast, ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_topk_encode_relu_zeroes_negative_selections():
    x = -torch.ones(2, 3)
    W = torch.eye(3)
    vals, _, _ = topk_encode(x, W, torch.zeros(3), 2)
    assert torch.all(vals == 0)
