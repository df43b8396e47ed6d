"""Vision variants, one file each: agent attention, MaxViT multi-axis (block / grid) attention."""
