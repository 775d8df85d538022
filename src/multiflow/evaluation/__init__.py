"""What pruning cost: VQA accuracy / ROUGE-L / KL (evaluate.py), perplexity of plain language models (perplexity.py)."""
