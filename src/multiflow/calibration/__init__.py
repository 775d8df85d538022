"""Step 2: calibration data, prompts, activation statistics, the block-by-block runner (calibrate.py wires them)."""
