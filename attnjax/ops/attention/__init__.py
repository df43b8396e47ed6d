"""The generic attention op, ``normalize(score_mod(scale * q k^T + bias), mask) v``: ``api``
(validation and dispatch), ``reference`` (dense), ``xla`` (blockwise) and ``pallas`` (kernels).

The public functions are ``attnjax.ops.attention`` and ``attnjax.ops.sigmoid_attention`` (this
package's name is shadowed there by the function; import its modules as
``from attnjax.ops.attention import xla``).
"""
