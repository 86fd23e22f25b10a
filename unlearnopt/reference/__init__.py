"""Pure-PyTorch references: the executable specification of every op (and its fallback)."""
