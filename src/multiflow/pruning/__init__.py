"""Step 3: scores, masks, allocations, SparseGPT reconstruction, and the pruned copy (prune.py)."""
