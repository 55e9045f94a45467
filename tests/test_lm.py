"""raysae.lm: the hooks on a decoder block's output."""

import pytest
import torch
from torch import nn

from raysae.lm import replaced_output


class Block(nn.Module):
    """A stand-in decoder layer returning its output as a tensor, a tuple, or something else."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def forward(self, x):
        y = 2 * x
        return {"tensor": y, "tuple": (y, "cache"), "dict": {"hidden": y}}[self.kind]


@pytest.mark.parametrize("kind", ["tensor", "tuple"])
def test_the_hook_handles_tensor_and_tuple_outputs(kind):
    block, x = Block(kind), torch.ones(2, 3, 4)
    with replaced_output(block, lambda h: h + 1):
        out = block(x)
    after = block(x)
    if kind == "tuple":
        assert out[1] == "cache" and after[1] == "cache"
        out, after = out[0], after[0]
    assert torch.equal(out, 3 * x) and torch.equal(after, 2 * x)
    assert not block._forward_hooks


def test_an_unknown_block_output_is_named():
    block = Block("dict")
    with pytest.raises(TypeError, match="Block returned dict"), replaced_output(block, lambda h: h):
        block(torch.ones(1, 2))
    assert not block._forward_hooks
