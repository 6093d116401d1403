"""open-instruct2: a clean, single-process GRPO trainer."""
__version__ = "0.1.0"
