"""Model access: every family's data (families.py), the prunable layers by modality (inventory.py), a checkpoint as a runnable model (loading.py), GGUF import (gguf.py)."""
