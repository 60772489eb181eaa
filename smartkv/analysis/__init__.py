"""Analyses that explain the results: where attention goes, and whether it marks the tokens
whose quantization hurts (the project's hypothesis). Library code, testable without DVC."""
