"""The workflow's stages, each cached by a hash of its config and inputs (see cache.py)."""
