"""Human-facing output: console reports (console.py) and the distribution chart (plots.py)."""
