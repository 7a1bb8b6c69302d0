"""prunebench: LLM weight-pruning methods compared on one footing."""

__version__ = "0.1.0"
