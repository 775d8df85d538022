"""Step 1: per-layer sparsity by modality from exact magnitude thresholds (distribute.py, selection.py)."""
