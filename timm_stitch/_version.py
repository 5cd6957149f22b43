"""The package version, below every module that records it (cards, the CLI)."""
__version__ = '0.1.0'
