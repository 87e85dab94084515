"""Evaluations against a running server: `python3 -m maxtext.eval.mmlu`."""
