"""The errors timm-stitch raises for faults a user may want to catch by type.

Each subclasses the builtin that was raised for that fault before it had a type, so ``except ValueError`` (or
``OSError``...) still catches it. This module imports nothing of timm-stitch: every module can raise these.
"""
from __future__ import annotations

__all__ = [
    'UnsupportedAnchorError', 'AdapterMismatchError', 'IncompatibleAnchorsError', 'RouteIdError', 'ReleaseFormatError',
    'WeightsMismatchError', 'CardError',
    'StaleCardError', 'MissingMeasurementError', 'MissingLatencyProfileError', 'NoRouteFitsError', 'DownloadError',
    'DiskFullError', 'ForeignFilesError', 'NoImagesError', 'UnknownAnchorError',
]


# ---- building and running ---------------------------------------------------------------------------------------

class UnsupportedAnchorError(TypeError):
    """An anchor's family cannot be split into embedding, blocks and finish (no blocks in its ``feature_info``, code
    that cannot be traced, values other than the activation crossing every block boundary); the message names the
    family and the reason."""


class UnknownAnchorError(ValueError, RuntimeError):
    """An anchor names no timm architecture; the message suggests the closest names. A ``RuntimeError`` too, as
    timm's own 'Unknown model' error."""


class AdapterMismatchError(ValueError):
    """An adapter's embedding, units and finish do not reproduce the anchor's own ``forward_features`` / ``forward``
    on the probe image (checked when the anchor is adapted)."""


class IncompatibleAnchorsError(ValueError):
    """The anchors cannot be stitched as asked: their input sizes, channels, stage counts, activation layouts or
    token counts / spatial sizes at the stitched positions differ; the message names the anchors and what differs."""


class RouteIdError(ValueError):
    """A route id (``stitch_id``) is not one of the model's routes: the message names the valid range."""


# ---- weights ----------------------------------------------------------------------------------------------------

class ReleaseFormatError(ValueError):
    """A file is not the official SN-Net release checkpoint (or the converted weights) it is loaded as: another
    format, truncated or corrupt, or keys that are not the release's."""


class WeightsMismatchError(ValueError):
    """A checkpoint holds the weights of another architecture (or of other model arguments) than the model's."""


# ---- route cards ------------------------------------------------------------------------------------------------

class CardError(ValueError):
    """A route card holds a value of the wrong type or out of range; the message names the route and the field."""


class StaleCardError(ValueError):
    """The card's accuracies do not hold for the model's weights or arguments (or it has none)."""


class MissingMeasurementError(ValueError):
    """A query needs route values the model's card does not hold for it (latencies of its profile, accuracies)."""


class MissingLatencyProfileError(ValueError):
    """The card holds no latency profile for this device, dtype and batch size."""


class NoRouteFitsError(ValueError):
    """A request's bounds exclude every route; ``field`` names the bound."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


# ---- files and downloads ----------------------------------------------------------------------------------------

class DownloadError(OSError):
    """A download failed (dropped, stalled, reset, refused); nothing was written to the cache file."""


class DiskFullError(OSError):
    """A write failed for want of space (``ENOSPC``, a quota, or a file size limit): the message names the path,
    the folder's free space, and that the old version of the file is kept."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


class ForeignFilesError(FileExistsError):
    """The folder (or file) a writer was given holds files timm-stitch did not write: nothing was written, nothing
    removed."""


class NoImagesError(FileNotFoundError, RuntimeError):
    """A dataset folder holds no images (timm's ``RuntimeError``, as a missing-input error)."""
