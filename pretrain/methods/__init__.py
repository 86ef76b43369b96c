"""Pretraining methods: each owns its networks and turns a batch into a loss dict for the one train loop."""

from pretrain.methods.base import Method
from pretrain.methods.mae import MaskedAutoencoder

__all__ = ["MaskedAutoencoder", "Method"]
