"""Attention whose scores are not (only) ``q . k``: pairwise score functions evaluated tile by tile
(:func:`attnjax.score_mods.pairwise`), content-dependent relative logits, and ops that factor a
pairwise quantity through ordinary attention. One file per mechanism."""
