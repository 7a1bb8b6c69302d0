"""Evaluation: perplexity (perplexity.py) and zero-shot accuracy through lm-eval (zeroshot.py)."""
