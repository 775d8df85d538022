"""Dual-encoder benchmark: a CLIP-style model with the pretrained MiniLM text tower, and the judges
that measure what pruning it costs (see README.md in this folder)."""
