"""On-device latency of every route: warm-up, repeated timing, median and p90, written into a route card."""
from __future__ import annotations

import functools
import platform
import re
import time
import warnings
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Optional, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from ._modes import eval_mode
from .unwrap import unwrap_stitched

if TYPE_CHECKING:
    from .cards import RouteCard
    from .model import StitchedNet

__all__ = ['profile', 'device_profile', 'latency_stats']

DeviceLike = Union[str, torch.device]


@functools.cache
def _cpu_name() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or 'unknown'


def _slug(text: str) -> str:
    return re.sub(r'[^a-z0-9]+', '_', text.lower()).strip('_')


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix('torch.')


def device_profile(device: DeviceLike = 'cpu', batch_size: int = 1, dtype: torch.dtype = torch.float32,
                   quant_scheme: Optional[str] = None) -> str:
    """The key latencies are stored under, e.g. ``'cpu-amd_epyc-2t-bs1-float32'`` or
    ``'cuda-nvidia_h100_80gb_hbm3-bs1-float16'`` (CPU keys include the thread count, which latency depends on); a
    quantized model's key names its scheme instead of the dtype (``'cpu-amd_epyc-2t-bs1-int8-dyn'``)."""
    device = torch.device(device)
    if device.type == 'cuda':
        name = _slug(torch.cuda.get_device_name(device))
    elif device.type == 'cpu':
        name = f'{_slug(_cpu_name())}-{torch.get_num_threads()}t'
    else:
        name = device.type
    return f'{device.type}-{name}-bs{batch_size}-{quant_scheme or _dtype_name(dtype)}'


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _timed_call(model: StitchedNet, stitch_id: int, images: torch.Tensor) -> float:
    """Milliseconds of one forward of route ``stitch_id`` (synchronised before and after on CUDA)."""
    _sync(images.device)
    start = time.perf_counter()
    model(images, stitch_id=stitch_id)
    _sync(images.device)
    return (time.perf_counter() - start) * 1e3


def latency_stats(times_ms: Sequence[float], batch_size: int = 1) -> dict[str, float]:
    """Median and p90 latency (ms) of repeated calls, and the throughput (images/s) at the median: the one
    definition of these statistics in timm-stitch (p90 linearly interpolated, as ``numpy.percentile``)."""
    median = float(np.median(times_ms))
    return {'median_ms': median, 'p90_ms': float(np.percentile(times_ms, 90)), 'throughput': batch_size / median * 1e3}


def profile(
        model: StitchedNet,
        device: DeviceLike = 'cpu',
        batch_size: int = 1,
        dtype: torch.dtype = torch.float32,
        warmup: int = 2,
        repeats: int = 10,
        routes: Optional[Sequence[int]] = None,
        out: Optional[str] = None,
        progress: bool = True,
) -> RouteCard:
    """Measure every route's latency (or those in ``routes``) on ``device`` and return a card holding it.

    The model is moved to ``device``/``dtype`` (and left there) and timed in eval mode on random images at its
    default input size: ``warmup`` untimed calls per route, then ``repeats`` rounds timing each route once. The
    result is merged into the model's loaded card (or a new one from :meth:`RouteCard.from_model`), loaded into
    the model so that ``routes()`` reports ``latency_ms`` (while the model stays on that device and dtype), and
    saved to ``out`` when given. The defaults keep a
    full DeiT-Ti/S/B sweep (71 routes, batch 1) to a few minutes on a 2-core CPU. A model inside DDP or
    DataParallel is timed as the model itself; one inside ``torch.compile`` too, in eager mode (with a warning).
    """
    from .cards import RouteCard
    from .macs import model_input_size

    if hasattr(model, '_orig_mod'):
        warnings.warn('profile times the eager model inside torch.compile: the latencies are not those of the '
                      'compiled model', stacklevel=2)
    model = unwrap_stitched(model, 'profile')

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f'batch_size must be a positive integer, got {batch_size!r}')
    if warmup < 0 or repeats < 1:
        raise ValueError(f'need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}')
    device = torch.device(device)
    ids = list(range(model.num_routes)) if routes is None else [model.check_stitch_id(i) for i in routes]
    key = device_profile(device, batch_size, dtype, model.quant_scheme)
    model.to(device=device, dtype=dtype)
    images = torch.randn(batch_size, *model_input_size(model), device=device, dtype=dtype)
    started = time.perf_counter()
    times: dict[int, list[float]] = {i: [] for i in ids}
    with eval_mode(model):
        # warm every route up, then time round-robin so that a burst of outside load hits all routes alike
        with torch.inference_mode(), tqdm(total=len(ids) * (warmup + repeats), desc=f'profiling {key}',
                                          unit='call', disable=not progress) as bar:
            for stitch_id in ids:
                for _ in range(warmup):
                    _timed_call(model, stitch_id, images)
                    bar.update()
            for _ in range(repeats):
                for stitch_id in ids:
                    times[stitch_id].append(_timed_call(model, stitch_id, images))
                    bar.update()
    stats = {i: latency_stats(t, batch_size) for i, t in times.items()}
    record = {
        'what': 'latency', 'profile': key, 'who': 'timm_stitch.profile',
        'when': datetime.now(timezone.utc).isoformat(timespec='seconds'),
        'device': torch.cuda.get_device_name(device) if device.type == 'cuda' else _cpu_name(),
        'threads': torch.get_num_threads(), 'batch_size': batch_size, 'dtype': _dtype_name(dtype),
        'quantization': model.quant_scheme,
        'warmup': warmup, 'repeats': repeats, 'torch': torch.__version__, 'python': platform.python_version(),
        'wall_s': round(time.perf_counter() - started, 1),
    }
    card = model.card if model.card is not None else RouteCard.from_model(model)
    card = card.with_latency(key, stats, record)
    model.load_card(card, batch_size=batch_size)
    if out is not None:
        card.save(out)
    return card
