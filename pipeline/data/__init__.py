"""Data in: WebDataset shards (img2dataset layout), the embedded demo data and its evaluator."""
