"""timm-stitch: Stitchable Neural Networks (SN-Net) for timm.

Importing the package registers the ``snnet_*`` architectures in timm's model registry.
"""
from . import models  # noqa: F401  (registers the architectures)
from .compile import CompiledStitchedNet, compile
from .ls_init import init_stitches
from .model import StitchedNet
from .routes import Route, StitchPlan, format_route_table, plan_staged_routes, plan_token_routes

__version__ = '0.1.0'

__all__ = [
    'StitchedNet', 'CompiledStitchedNet', 'compile', 'Route', 'StitchPlan', 'init_stitches', 'format_route_table',
    'plan_token_routes', 'plan_staged_routes', '__version__',
]
