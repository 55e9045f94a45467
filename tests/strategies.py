"""Hypothesis strategies for raysae's property tests. Builders are keyword-only.

Tensors are generated from a drawn seed plus drawn shape, scale, mean offset, structure and
dtype: that keeps examples fast at realistic sizes, and the drawn parameters are where metric
code breaks (|μ| ≫ σ in float32, rank-deficient or duplicated tokens, all-zero rows, d = 1).
"""

from __future__ import annotations

import math
from typing import Callable, Collection, Sequence, TypeVar, Union

import torch
from hypothesis import assume
from hypothesis import strategies as st
from torch import Tensor

from raysae.config import SAEConfig
from raysae.saes import ARCHITECTURES
from raysae.saes.sparse import SparseLatents

F64 = torch.float64
KINDS = ("gaussian", "low_rank", "heavy_tailed", "duplicates", "zero_rows")
"""Structures of generated activations."""


@st.composite
def activations(
    draw,
    *,
    min_tokens: int = 2,
    max_tokens: int = 48,
    min_d: int = 1,
    max_d: int = 12,
    dtypes: Sequence[torch.dtype] = (torch.float32, torch.float64),
    mean_ratios: Sequence[float] = (0.0, 1.0, 1e2, 1e4),
    kinds: Sequence[str] = KINDS,
) -> Tensor:
    """(N, d) activations: σ ≈ scale per dimension, a mean offset of |μ| ≈ ratio · σ · √d."""
    n = draw(st.integers(min_tokens, max_tokens))
    d = draw(st.integers(min_d, max_d))
    scale = 10.0 ** draw(st.integers(-3, 3))
    ratio = draw(st.sampled_from(mean_ratios))
    kind = draw(st.sampled_from(kinds))
    dtype = draw(st.sampled_from(dtypes))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    x = torch.randn(n, d, generator=g, dtype=F64)
    if kind == "low_rank":
        x = x[:, :1] @ torch.randn(1, d, generator=g, dtype=F64)
    elif kind == "heavy_tailed":
        x = x * torch.randn(n, 1, generator=g, dtype=F64).mul(2).exp()
    elif kind == "duplicates":
        x = x[torch.randint(0, max(1, n // 3), (n,), generator=g)]
    mean = torch.randn(d, generator=g, dtype=F64)
    mean = mean / mean.norm() * ratio * math.sqrt(d)
    x = (x + mean) * scale
    if kind == "zero_rows":  # some tokens, or all of them, exactly zero
        x[torch.rand(n, generator=g) < draw(st.sampled_from([0.3, 1.0]))] = 0.0
    return x.to(dtype)


@st.composite
def reconstructions(draw, x: Tensor) -> Tensor:
    """A plausible x̂ for x, in x's dtype: exact, shrunk, noisy, the mean, zero or unrelated."""
    kind = draw(st.sampled_from(("exact", "shrunk", "noisy", "mean", "zero", "unrelated")))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    x64 = x.to(F64)
    spread = float(x64.std()) if x.numel() > 1 else 1.0
    if kind == "exact":
        x_hat = x64
    elif kind == "shrunk":
        x_hat = x64 * draw(st.floats(0.1, 1.0))
    elif kind == "noisy":
        x_hat = x64 + draw(st.floats(1e-3, 1.0)) * spread * torch.randn(
            x.shape, generator=g, dtype=F64
        )
    elif kind == "mean":
        x_hat = x64.mean(0).expand_as(x64)
    elif kind == "zero":
        x_hat = torch.zeros_like(x64)
    else:
        x_hat = spread * torch.randn(x.shape, generator=g, dtype=F64)
    return x_hat.to(x.dtype)


@st.composite
def sae_configs(
    draw,
    *,
    architectures: Sequence[str] = tuple(ARCHITECTURES),
    max_d_in: int = 12,
    max_latents: int = 32,
) -> SAEConfig:
    """A small valid SAEConfig of any architecture (k ≤ n_latents for the TopK family;
    Matryoshka groups as latent counts summing to n_latents, so no group is empty)."""
    n_latents = draw(st.integers(1, max_latents))
    architecture = draw(st.sampled_from(architectures))
    groups = {}
    if architecture == "matryoshka_batchtopk":
        cuts = []
        if n_latents > 1:
            cuts = draw(st.lists(st.integers(1, n_latents - 1), max_size=3, unique=True))
        ends = [0, *sorted(cuts), n_latents]
        groups["matryoshka_groups"] = tuple(float(b - a) for a, b in zip(ends, ends[1:]))
    return SAEConfig(
        d_in=draw(st.integers(1, max_d_in)),
        n_latents=n_latents,
        architecture=architecture,
        **groups,
        k=draw(st.integers(1, n_latents)),
        l1_coefficient=draw(st.sampled_from([0.0, 0.1, 5.0])),
        l0_coefficient=draw(st.sampled_from([0.0, 1e-3, 1.0])),
        jumprelu_init_threshold=draw(st.sampled_from([1e-3, 0.1, 1.0])),
        jumprelu_bandwidth=draw(st.sampled_from([1e-3, 0.1, 1.0])),
        b_dec_init=draw(st.sampled_from(["geometric_median", "mean", "zeros"])),
        normalize_inputs=draw(st.booleans()),
    )


@st.composite
def sparse_latents(draw, *, max_tokens: int = 40, max_latents: int = 24) -> SparseLatents:
    """Active latents as the TopK family lists them: per token (TopK: k distinct latents per
    row, row-major) or per batch (BatchTopK: any distinct (row, col) pairs, in any order).
    Values ≥ 0, some exactly 0 (a top-k pre-activation clipped by the ReLU: not fired)."""
    b, n = draw(st.integers(0, max_tokens)), draw(st.integers(1, max_latents))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    if draw(st.sampled_from(["topk", "batchtopk"])) == "topk":
        k = draw(st.integers(1, n))
        cols = torch.rand(b, n, generator=g).argsort(-1)[:, :k]
        rows = torch.arange(b).repeat_interleave(k)
        cols = cols.reshape(-1)
    else:
        nnz = draw(st.integers(0, b * n))
        flat = torch.randperm(b * n, generator=g)[:nnz]
        rows, cols = flat // n, flat % n
    values = torch.randn(rows.shape[0], generator=g).abs()
    zeros = draw(st.sampled_from([0.0, 0.3, 1.0]))  # fraction of listed entries clipped to 0
    values = values * (torch.rand(rows.shape[0], generator=g) >= zeros)
    return SparseLatents(rows, cols, values, b, n)


@st.composite
def partitions(draw, n: int, *, max_parts: int = 6) -> list[tuple[int, int]]:
    """Contiguous (start, stop) slices covering range(n) in order; parts may be empty."""
    cuts = sorted(draw(st.lists(st.integers(0, n), min_size=0, max_size=max_parts - 1)))
    bounds = [0, *cuts, n]
    return list(zip(bounds[:-1], bounds[1:]))


Tree = Union[int, tuple["Tree", "Tree"]]
T = TypeVar("T")


@st.composite
def merge_trees(draw, n_leaves: int) -> Tree:
    """A random binary tree over a random permutation of leaf indices 0..n_leaves-1: an order
    and a grouping in which to merge n_leaves accumulators."""
    nodes: list[Tree] = list(draw(st.permutations(range(n_leaves))))
    while len(nodes) > 1:
        i = draw(st.integers(0, len(nodes) - 2))
        nodes[i : i + 2] = [(nodes[i], nodes[i + 1])]
    return nodes[0]


def fold_tree(tree: Tree, leaves: Sequence[T], merge: Callable[[T, T], T]) -> T:
    """Combine `leaves` as `tree` says, e.g. ((2, 0), 1) → merge(merge(l2, l0), l1)."""
    if isinstance(tree, int):
        return leaves[tree]
    return merge(fold_tree(tree[0], leaves, merge), fold_tree(tree[1], leaves, merge))


@st.composite
def unknown_keys(draw, known: Collection[str]) -> str:
    """A setting name that is not in `known`: a typo of a known one (a letter dropped, doubled
    or swapped with the next), or any snake_case name."""
    typo = st.sampled_from(sorted(known)).flatmap(
        lambda key: st.tuples(
            st.just(key), st.integers(0, len(key) - 1), st.sampled_from(["drop", "double", "swap"])
        )
    )
    made_up = st.from_regex(r"[a-z][a-z0-9_]{0,15}", fullmatch=True)
    choice = draw(st.one_of(typo, made_up) if known else made_up)
    if isinstance(choice, tuple):
        key, i, edit = choice
        choice = {
            "drop": key[:i] + key[i + 1 :],
            "double": key[: i + 1] + key[i:],
            "swap": key[:i] + key[i + 1 : i + 2] + key[i : i + 1] + key[i + 2 :],
        }[edit]
    assume(choice and choice not in known)
    return choice


MANIFEST_FIELDS = (
    ("model",),
    ("revision",),
    ("hook",),
    ("layer",),
    ("d_in",),
    ("dtype",),
    ("n_tokens",),
    ("parts",),
    ("harvest",),
    ("format_version",),
    ("stats",),
    ("stats", "count"),
    ("stats", "sum"),
    ("stats", "squared_norm_sum"),
    *(
        (
            ("parts", i, key)
            for i in range(3)
            for key in ("name", "rows", "bytes", "sha256", "crc32")
        )
    ),
)
"""Paths into the manifest JSON of a 3-part dataset, for `dataset_mutations`."""


@st.composite
def dataset_mutations(draw, *, n_parts: int = 3) -> tuple:
    """One corruption of a committed dataset of `n_parts` parts, as a tuple to apply:

    ("flip", part, where, position, mask)   XOR one byte of a part with `mask` (1..255) at
                                            `position` (modulo the size) of the whole file, or
                                            of its act column chunk (`where` = "act")
    ("truncate", keep)                      manifest.json cut to `keep` bytes (modulo its size)
    ("field", path, edit)                   a manifest field deleted, retyped, negated, or a
                                            key added beside it (see MANIFEST_FIELDS)
    """
    kind = draw(st.sampled_from(["flip", "truncate", "field"]))
    if kind == "flip":
        return (
            "flip",
            draw(st.integers(0, n_parts - 1)),
            draw(st.sampled_from(["file", "act"])),
            draw(st.integers(0, 2**20)),
            draw(st.integers(1, 255)),
        )
    if kind == "truncate":
        return ("truncate", draw(st.integers(0, 2**20)))
    path = draw(st.sampled_from([p for p in MANIFEST_FIELDS if len(p) < 3 or p[1] < n_parts]))
    return ("field", path, draw(st.sampled_from(["delete", "retype", "negate", "add"])))


BAD_VALUES = (-1, 0, 1.5, 10**30, 1e300, math.inf, -math.inf, math.nan, "", "x", True, None)
BAD_VALUES += ([], [1, 2], {}, {"a": {"b": 1}})
"""Values of the wrong type or out of range, for any setting."""


def _paths(node, prefix: tuple = ()) -> list[tuple]:
    """Every key path into nested dicts and lists: ("base", "sae", "k"), ("space", "sae.k", 0)."""
    items = node.items() if isinstance(node, dict) else enumerate(node)
    paths = []
    for key, value in items:
        paths.append((*prefix, key))
        if isinstance(value, (dict, list)):
            paths.extend(_paths(value, (*prefix, key)))
    return paths


@st.composite
def mutated(draw, spec: dict, *, max_mutations: int = 3) -> dict:
    """A deep copy of `spec` (plain data) with 1..max_mutations edits: a key deleted, a value
    replaced by one of BAD_VALUES (or a nested dict, a list), or an unknown key added."""
    import copy

    spec = copy.deepcopy(spec)
    for _ in range(draw(st.integers(1, max_mutations))):
        paths = _paths(spec)
        if not paths:
            break
        *parent, key = draw(st.sampled_from(paths))
        node = spec
        for part in parent:
            node = node[part]
        edit = draw(st.sampled_from(["delete", "replace", "add"]))
        if edit == "delete":
            del node[key]
        elif edit == "replace":
            node[key] = copy.deepcopy(draw(st.sampled_from(BAD_VALUES)))
        elif isinstance(node, dict):
            node[draw(st.from_regex(r"[a-z][a-z_.]{0,8}", fullmatch=True))] = 1
        else:
            node.append(copy.deepcopy(draw(st.sampled_from(BAD_VALUES))))
    return spec
