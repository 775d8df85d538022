"""Experiments: quality judges on real pretrained weights (run as `python -m experiments.<name>...` from the repository root)."""
