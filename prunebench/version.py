"""The release, in its own module so that code below the public API can name it."""
__version__ = "0.1.0"
