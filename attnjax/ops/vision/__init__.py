"""Vision variants, one file each: agent attention, MaxViT multi-axis (block / grid) attention, and
zoo part 1: bilinear sampling (``sampling``), multi-scale deformable attention (``deformable``),
channel-as-token attention (``channel``), HaloNet (``halo``), area attention (``area``), GC ViT's
global-query windows (``gcvit``), VSA (``vsa``), VWA (``vwa``), CATANet (``catanet``) and the
attention diversification loss (``adl``)."""
