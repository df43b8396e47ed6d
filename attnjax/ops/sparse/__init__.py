"""Routed and sparse variants, one file each: BiFormer, Routing Transformer, MoA, HyperAttention,
landmark attention; ``common`` holds the dense reference they reduce to."""
