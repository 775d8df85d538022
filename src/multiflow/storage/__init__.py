"""Files: safetensors reading (checkpoint.py), safe output files and folders (outputs.py), stats.safetensors (stats_file.py)."""
