"""Set, classic and cross-modal attention (zoo part 4), one file each: additive (Bahdanau) and
graph attention on per-tile pairwise scores, the Set Transformer's MAB, BiDAF, reversed attention,
dual cross-attention, gated MIL pooling."""
