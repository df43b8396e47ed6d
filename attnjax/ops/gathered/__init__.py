"""Gathered sparse attention from index sets (zoo primitive C2): each query block attends only to
the key blocks it lists. ``api`` (validation and dispatch), ``reference`` (``ops.attention`` under
the dense mask the lists imply), ``xla`` (gather the listed blocks, one small dense attention per
query block, in chunks of query blocks so memory stays linear in length)."""
