"""timm-stitch: Stitchable Neural Networks (SN-Net) for timm.

Importing the package registers the ``snnet_*`` architectures in timm's model registry.
"""
from . import models  # noqa: F401  (registers the architectures)
from ._version import __version__
from .bn import recalibrate_bn
from .builder import StitchOptions, stitch
from .cards import RouteCard
from .cascade import Cascade
from .catalogue import RouteCatalogue
from .compiling import CompiledStitchedNet, compile
from .convert import convert_official
from .errors import (
    AdapterMismatchError,
    CardError,
    DiskFullError,
    DownloadError,
    ForeignFilesError,
    IncompatibleAnchorsError,
    MissingLatencyProfileError,
    MissingMeasurementError,
    NoImagesError,
    NoRouteFitsError,
    ReleaseFormatError,
    RouteIdError,
    StaleCardError,
    UnknownAnchorError,
    UnsupportedAnchorError,
    WeightsMismatchError,
)
from .explorer import explore
from .export import StitchedRoute, export_stitch
from .features import StitchedFeatures
from .hub import push_to_hub, save_pretrained
from .ls_init import init_stitches
from .macs import count_route_macs
from .model import StitchedNet, register_release_loader
from .models._loading import load_release
from .profiling import device_profile, profile
from .quantization import QuantizedLinear, quantize
from .route_spaces import plan_routes, plan_two_way_routes
from .routes import Route, StitchPlan, format_route_table, plan_staged_routes, plan_token_routes
from .sampling import RouteSampler

register_release_loader(load_release)  # pretrained=True: the model reads releases through the models package

__all__ = [
    'StitchedNet', 'CompiledStitchedNet', 'compile', 'Route', 'StitchPlan', 'init_stitches', 'format_route_table',
    'plan_token_routes', 'plan_staged_routes', 'plan_two_way_routes', 'plan_routes', '__version__',
    'RouteCard', 'CardError', 'RouteCatalogue', 'MissingMeasurementError', 'count_route_macs', 'profile',
    'device_profile',
    'stitch', 'StitchOptions', 'recalibrate_bn',
    'save_pretrained', 'push_to_hub', 'export_stitch', 'StitchedRoute', 'convert_official',
    'RouteSampler', 'Cascade', 'StitchedFeatures', 'explore', 'quantize', 'QuantizedLinear',
    'ForeignFilesError', 'WeightsMismatchError', 'DiskFullError', 'DownloadError', 'IncompatibleAnchorsError',
    'RouteIdError', 'ReleaseFormatError', 'StaleCardError', 'MissingLatencyProfileError', 'NoRouteFitsError',
    'NoImagesError', 'UnsupportedAnchorError', 'UnknownAnchorError', 'AdapterMismatchError',
]
