"""SAE architectures. Adding one: a file here with a SparseAutoencoder subclass, and a line below."""

from raysae.config import SAEConfig
from raysae.saes.base import SAEOutput, SparseAutoencoder, initial_values
from raysae.saes.batchtopk import BatchTopKSAE
from raysae.saes.crosscoder import CrosscoderSAE
from raysae.saes.gated import GatedSAE
from raysae.saes.jumprelu import JumpReLUSAE
from raysae.saes.matryoshka import MatryoshkaBatchTopKSAE
from raysae.saes.relu import ReLUSAE
from raysae.saes.topk import TopKSAE

ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {
    "relu": ReLUSAE,
    "topk": TopKSAE,
    "batchtopk": BatchTopKSAE,
    "jumprelu": JumpReLUSAE,
    "gated": GatedSAE,
    "matryoshka_batchtopk": MatryoshkaBatchTopKSAE,
    "crosscoder": CrosscoderSAE,
}


def build_sae(cfg: SAEConfig) -> SparseAutoencoder:
    """A freshly initialised SAE of cfg.architecture."""
    try:
        cls = ARCHITECTURES[cfg.architecture]
    except KeyError:
        raise ValueError(
            f"unknown architecture {cfg.architecture!r}; choose one of {', '.join(ARCHITECTURES)}"
        ) from None
    return cls(cfg)


__all__ = ["ARCHITECTURES", "SAEOutput", "SparseAutoencoder", "build_sae", "initial_values"]
