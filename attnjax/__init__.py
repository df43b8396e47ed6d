"""attnjax: attention variants as pure, composable JAX functions, with Pallas fast paths."""

from attnjax import analysis, core, dropout, features, masks, nn, normalizers, ops, parallel, score_mods

__version__ = "0.1.0"  # the one version: pyproject.toml reads it (CHANGELOG.md says what changed)

__all__ = ["analysis", "core", "dropout", "features", "masks", "nn", "normalizers", "ops", "parallel", "score_mods"]
