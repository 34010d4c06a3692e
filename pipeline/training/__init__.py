"""The ldm training loop's parts: its input order, EMA, checkpoints, and watching its progress."""
