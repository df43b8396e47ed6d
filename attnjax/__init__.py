"""attnjax: attention variants as pure, composable JAX functions, with Pallas fast paths."""

from attnjax import dropout, features, masks, nn, normalizers, ops, score_mods

__version__ = "0.1.0"

__all__ = ["dropout", "features", "masks", "nn", "normalizers", "ops", "score_mods"]
