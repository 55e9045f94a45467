"""Fast paths equal plain paths: sparse decode and the sparse TopK encoder backward."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from raysae.saes import sparse
from raysae.saes.sparse import (
    dense_topk_encode,
    ragged_decode,
    row_topk,
    sparse_decode,
    topk_encode,
)


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


# n=96 takes torch.topk (too few groups of 16 for k=6), n=512 the grouped row_topk.
@pytest.mark.parametrize("n", [96, 512])
def test_topk_encode_backward_equals_dense_autograd(seeded, n):
    B, d, k = 32, 16, 6
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


@pytest.mark.parametrize("x_needs_grad", [False, True])
@pytest.mark.parametrize("use_pre", [False, True])
def test_topk_encode_centre_gradients_equal_dense_autograd(seeded, x_needs_grad, use_pre):
    # The centre's gradient is formed from the b_enc gradient (no input gradient when the data
    # needs none); it and every other gradient must equal plain autograd through x − centre,
    # also when the dense pre-activations feed the loss too (AuxK's path).
    B, n, d, k = 24, 512, 16, 5
    x = torch.randn(B, d, requires_grad=x_needs_grad)
    W = torch.randn(n, d, requires_grad=True)
    b = torch.randn(n, requires_grad=True)
    centre = torch.randn(d, requires_grad=True)
    inputs = (W, b, centre) + ((x,) if x_needs_grad else ())
    weights = torch.randn(B, k)
    pre_weights = torch.randn(B, n)

    vals, idx, pre = topk_encode(x, W, b, k, centre)
    order = idx.argsort(-1)  # weight each token's chosen latents in latent order, both paths
    loss = (vals.gather(1, order) * weights).sum() + ((pre * pre_weights).sum() if use_pre else 0.0)
    fast = torch.autograd.grad(loss, inputs)

    ref_pre = torch.nn.functional.linear(x - centre, W, b)
    ref_vals, ref_idx = ref_pre.topk(k, dim=-1, sorted=False)
    assert torch.equal(idx.sort(-1).values, ref_idx.sort(-1).values)
    ref_order = ref_idx.argsort(-1)
    ref_loss = (ref_vals.relu().gather(1, ref_order) * weights).sum() + (
        (ref_pre * pre_weights).sum() if use_pre else 0.0
    )
    ref = torch.autograd.grad(ref_loss, inputs)
    for name, a, r in zip(("W_enc", "b_enc", "centre", "x"), fast, ref):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4, msg=name)


@given(
    rows=st.integers(1, 6),
    groups=st.integers(4, 40),
    k=st.integers(1, 10),
    distinct=st.sampled_from([2, 5, 1000]),
    seed=st.integers(0, 2**16),
)
def test_row_topk_gives_torch_topk_values_ties_included(rows, groups, k, distinct, seed):
    # Few distinct values make ties the rule: the grouped top-k must still return the row's k
    # largest values (as a multiset), at k distinct columns that hold them.
    n = sparse._TOPK_GROUP * groups
    gen = torch.Generator().manual_seed(seed)
    pre = torch.randint(0, distinct, (rows, n), generator=gen).float() - distinct / 2
    pre[:, : n // 3] += torch.randn(rows, n // 3, generator=gen)  # some rows' columns untied
    k = min(k, n)
    values, indices = row_topk(pre, k)
    expected, _ = pre.topk(k, dim=-1)
    assert torch.equal(values.sort(-1).values, expected.sort(-1).values)
    assert torch.equal(pre.gather(1, indices), values)
    assert all(len(set(row.tolist())) == k for row in indices)


def test_row_topk_keeps_nan_and_inf_where_torch_topk_does():
    # Diverged pre-activations must surface in the values (and so in the loss, which stops the
    # run), never be skipped by the grouping: NaN and +Inf are picked first, as by torch.topk.
    pre = torch.randn(3, sparse._TOPK_GROUP * 8)
    pre[1, 37], pre[2, 5] = float("nan"), float("inf")
    values, indices = row_topk(pre, 2)
    assert values[1].isnan().any() and 37 in indices[1].tolist()
    assert values[2].isinf().any() and 5 in indices[2].tolist()
    expected, _ = pre[0].topk(2)
    assert torch.equal(values[0].sort().values, expected.sort().values)


def test_row_topk_grouped_path_is_taken_where_it_applies(monkeypatch):
    # The grouped path runs (not a silent fallback) for n = 16·m with m ≥ 4k, and not otherwise.
    calls = []
    real_amax = torch.Tensor.amax
    monkeypatch.setattr(
        torch.Tensor, "amax", lambda t, *a, **kw: calls.append(t.shape) or real_amax(t, *a, **kw)
    )
    row_topk(torch.randn(3, 16 * 8), 2)
    assert calls == [(3, 16, 8)]
    calls.clear()
    row_topk(torch.randn(3, 16 * 8), 3)  # m = 8 < 4k = 12
    row_topk(torch.randn(3, 100), 2)  # n not a multiple of 16
    assert calls == []


def test_topk_encode_relu_zeroes_negative_selections():
    x = -torch.ones(2, 3)
    W = torch.eye(3)
    vals, _, _ = topk_encode(x, W, torch.zeros(3), 2)
    assert torch.all(vals == 0)


@given(st.integers(1, 16), st.integers(1, 40), st.integers(1, 12), st.data())
def test_sparse_decode_equals_dense_decode_for_random_indices(B, n, d, data):
    # Any indices, repeats included: the contract is Σ_j values[b, j] · W_dec[indices[b, j]].
    k = data.draw(st.integers(1, n))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**32 - 1)))
    idx = torch.randint(0, n, (B, k), generator=g)
    vals = torch.randn(B, k, generator=g, dtype=torch.float64).requires_grad_()
    W = torch.randn(n, d, generator=g, dtype=torch.float64).requires_grad_()
    dense_latents = torch.zeros(B, n, dtype=torch.float64).scatter_add(1, idx, vals)
    sparse, dense = sparse_decode(idx, vals, W), dense_latents @ W
    torch.testing.assert_close(sparse, dense)
    upstream = torch.randn(B, d, generator=g, dtype=torch.float64)
    for a, b in zip(
        torch.autograd.grad(sparse, (W, vals), upstream),
        torch.autograd.grad(dense, (W, vals), upstream),
    ):
        torch.testing.assert_close(a, b)


@given(
    st.integers(1, 16),
    st.integers(1, 40),
    st.integers(1, 12),
    st.sampled_from([0.0, 0.1, 1.0]),
    st.integers(0, 2**32 - 1),
)
def test_ragged_decode_equals_dense_decode_for_random_latents(B, n, d, p, seed):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(B, n, generator=g, dtype=torch.float64)
    latents = latents * (torch.rand(B, n, generator=g) < p)
    W = torch.randn(n, d, generator=g, dtype=torch.float64)
    rows, cols = latents.nonzero(as_tuple=True)
    torch.testing.assert_close(ragged_decode(rows, cols, latents[rows, cols], W, B), latents @ W)


# -- the training step without dense latents ---------------------------------------------------


class _DenseLatents:
    """Calls the SAE like a DDP wrapper (`module` is the SAE) and hands back its output with
    dense latents only, as the TopK family's forward did before it had a sparse form."""

    def __init__(self, module):
        self.module = module

    def __call__(self, *args, **kwargs):
        from raysae.saes import SAEOutput

        out = self.module(*args, **kwargs)
        assert out.sparse is not None  # the TopK family does give a sparse form
        return SAEOutput(out.x_hat, out.sparse.dense(), out.losses)


def _train(architecture: str, dense: bool, steps: int = 6):
    """`steps` loop steps (raysae.loop._step_members, as training runs them) of a small SAE on
    fixed data; dense=True hides the sparse form from the step and the metrics, so they take
    the dense-latent path the TopK family used before it had one."""
    from raysae.config import SAEConfig, TrainConfig
    from raysae.loop import Member, World, _step_members
    from raysae.saes import build_sae

    torch.manual_seed(0)
    cfg = SAEConfig(d_in=8, n_latents=48, k=3, architecture=architecture, k_aux=4)
    model = build_sae(cfg)
    data = torch.randn(steps, 32, 8) * torch.linspace(0.1, 3.0, 8)
    model.init_from_sample_(data.flatten(0, 1))
    # A short dead window: latents go dead within the run, so AuxK (which reads the fired flags)
    # shapes the trajectory.
    train = TrainConfig(total_tokens=10_000, batch_size=32, dead_tokens=64, lr=3e-3)
    member = Member.of(model, train, torch.zeros(8))
    if dense:
        member.ddp = _DenseLatents(model)
    for batch in data:
        _step_members([member], batch, batch.shape[0], World())
    return member


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_training_from_sparse_latents_equals_the_dense_path(architecture):
    sparse, dense = _train(architecture, dense=False), _train(architecture, dense=True)
    assert int((dense.state.tokens_since_fired >= 64).sum()) > 0  # AuxK was on at some step
    for (name, a), b in zip(sparse.model.state_dict().items(), dense.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(sparse.state.tokens_since_fired, dense.state.tokens_since_fired)
    s, d = sparse.sparsity, dense.sparsity
    assert (s.n, s.begin, s.end) == (d.n, d.begin, d.end)
    assert torch.equal(s.fire_counts, d.fire_counts) and torch.equal(s.last_fired, d.last_fired)
    assert float(s.sums[0]) == float(d.sums[0])
    torch.testing.assert_close(s.sums[1], d.sums[1], rtol=1e-12, atol=0)
    assert torch.equal(sparse.recon.sums, dense.recon.sums)


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_training_forward_builds_no_dense_latents(architecture):
    """The step reads the sparse form only; `latents` is still there, built on demand."""
    from raysae.config import SAEConfig
    from raysae.saes import build_sae

    torch.manual_seed(0)
    model = build_sae(SAEConfig(d_in=8, n_latents=48, k=3, architecture=architecture))
    out = model(torch.randn(16, 8))
    assert out.sparse is not None and out._latents is None
    assert out.codes is out.sparse
    assert torch.equal(out.fired(), out.latents.amax(0) > 0)
    assert out.latents.shape == (16, 48) and int((out.latents != 0).sum()) <= 3 * 16
