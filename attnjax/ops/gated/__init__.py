"""Gated and structured variants, one file each: Mega, selective attention, multi-token attention,
mixture-of-head attention."""
