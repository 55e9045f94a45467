"""raysae: train and sweep sparse autoencoders on language-model activations with Ray."""

__version__ = "0.1.0"
