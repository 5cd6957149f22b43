"""Registered ``snnet_*`` architectures, one module per anchor family (importing them registers them in timm)."""
from . import snnet_deit  # noqa: F401
