"""prunebench: LLM weight-pruning methods compared on one footing."""

from prunebench.version import __version__  # noqa: F401
