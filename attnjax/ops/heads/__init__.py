"""Head-structure variants: ops whose heads are shaped, counted or modulated differently from
multi-head attention's (separate key/value head counts with selective value fetching, per-head
modulation). One file per mechanism."""
