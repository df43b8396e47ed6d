"""Linear-time variants built on :func:`attnjax.ops.linear_attention` (and so on the lightning
machinery for their causal forms): per-token scalars from ``O(T D)`` sums, then one or two linear
attentions. Each file has a dense reference (the ``[T, S]`` weights written out) that the linear
form is tested against. One file per mechanism."""
