"""Experiments: one config (or a built-in suite) → merges × quantizers × bits → report."""
