"""On-device latency of every route: warm-up, repeated timing, median and p90, written into a route card."""
from __future__ import annotations

import functools
import platform
import re
import time
import warnings
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from ._modes import eval_mode
from .unwrap import unwrap_stitched

if TYPE_CHECKING:
    from .cards import RouteCard
    from .model import StitchedNet

__all__ = ['profile', 'device_profile', 'latency_stats', 'timing_spread', 'unstable_routes', 'UnstableTimingWarning']

DeviceLike = Union[str, torch.device]

#: the largest relative interquartile range of a route's timings that ``profile`` accepts by default
MAX_SPREAD = 0.5


class UnstableTimingWarning(UserWarning):
    """Some routes' timings stayed unstable (other load on the machine): their latencies were not written."""


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


def timing_spread(times_ms: Sequence[float]) -> float:
    """How unstable repeated timings are: their interquartile range relative to their median (0 for identical
    times; a busy machine's bursts give values near or above 1)."""
    q25, median, q75 = np.percentile(times_ms, [25, 50, 75])
    return float((q75 - q25) / median) if median > 0 else 0.0


def unstable_routes(times: Mapping[int, Sequence[float]], max_spread: float = MAX_SPREAD) -> dict[int, float]:
    """``{route id: spread}`` of the routes whose timings spread more than ``max_spread`` (see
    :func:`timing_spread`)."""
    spreads = {i: timing_spread(t) for i, t in times.items()}
    return {i: round(s, 3) for i, s in spreads.items() if s > max_spread}


def _time_rounds(model: StitchedNet, ids: Sequence[int], images: torch.Tensor, repeats: int,
                 bar: Optional[tqdm] = None) -> dict[int, list[float]]:
    """``repeats`` rounds timing each route of ``ids`` once (round-robin, so that a burst of outside load hits all
    routes alike)."""
    times: dict[int, list[float]] = {i: [] for i in ids}
    for _ in range(repeats):
        for stitch_id in ids:
            times[stitch_id].append(_timed_call(model, stitch_id, images))
            if bar is not None:
                bar.update()
    return times


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
        max_spread: Optional[float] = MAX_SPREAD,
        retries: int = 2,
) -> RouteCard:
    """Measure every route's latency (or those in ``routes``) on ``device`` and return a card holding it.

    The model is moved to ``device``/``dtype`` (and left there) and timed in eval mode on random images at its
    default input size: ``warmup`` untimed calls per route, then ``repeats`` rounds timing each route once. The
    result is merged into the model's loaded card (or a new one from :meth:`RouteCard.from_model`), loaded into
    the model so that ``routes()`` reports ``latency_ms`` (while the model stays on that device and dtype), and
    saved to ``out`` when given. The defaults keep a
    full DeiT-Ti/S/B sweep (71 routes, batch 1) to a few minutes on a 2-core CPU. A model inside DDP or
    DataParallel is timed as the model itself; one inside ``torch.compile`` too, in eager mode (with a warning).

    Timings disturbed by other load are caught: a route whose timings spread more than ``max_spread`` (relative
    interquartile range, :func:`timing_spread`) is timed again, up to ``retries`` times; a route still unstable
    gets no latency in the card (an older one of this profile is dropped too), the provenance record lists it
    under ``unstable``, and an :class:`UnstableTimingWarning` names it. ``max_spread=None`` accepts any timings.
    """
    from .cards import RouteCard, check_card_target
    from .input_size import model_input_size
    if out is not None:
        check_card_target(out)  # before minutes of timing, not after

    if hasattr(model, '_orig_mod'):
        warnings.warn('profile times the eager model inside torch.compile: the latencies are not those of the '
                      'compiled model', stacklevel=2)
    model = unwrap_stitched(model, 'profile')

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f'batch_size must be a positive integer, got {batch_size!r}')
    if warmup < 0 or repeats < 1 or retries < 0:
        raise ValueError(f'need warmup >= 0, repeats >= 1 and retries >= 0, got warmup={warmup}, repeats={repeats}, '
                         f'retries={retries}')
    if max_spread is not None and not max_spread > 0:
        raise ValueError(f'max_spread must be a positive number (or None: accept any timings), got {max_spread!r}')
    device = torch.device(device)
    ids = list(range(model.num_routes)) if routes is None else [model.check_stitch_id(i) for i in routes]
    key = device_profile(device, batch_size, dtype, model.quant_scheme)
    model.to(device=device, dtype=dtype)
    images = torch.randn(batch_size, *model_input_size(model), device=device, dtype=dtype)
    started = time.perf_counter()
    unstable: dict[int, float] = {}
    retimed: list[int] = []
    with eval_mode(model):
        # warm every route up, then time round-robin
        with torch.inference_mode(), tqdm(total=len(ids) * (warmup + repeats), desc=f'profiling {key}',
                                          unit='call', disable=not progress) as bar:
            for stitch_id in ids:
                for _ in range(warmup):
                    _timed_call(model, stitch_id, images)
                    bar.update()
            times = _time_rounds(model, ids, images, repeats, bar)
            for attempt in range(retries + 1):
                unstable = unstable_routes(times, max_spread) if max_spread is not None else {}
                if not unstable or attempt == retries:
                    break
                retimed += [i for i in unstable if i not in retimed]
                times.update(_time_rounds(model, list(unstable), images, repeats))
    stats = {i: latency_stats(t, batch_size) for i, t in times.items() if i not in unstable}
    record = {
        'what': 'latency', 'profile': key, 'who': 'timm_stitch.profile',
        'when': datetime.now(timezone.utc).isoformat(timespec='seconds'),
        'device': torch.cuda.get_device_name(device) if device.type == 'cuda' else _cpu_name(),
        'threads': torch.get_num_threads(), 'batch_size': batch_size, 'dtype': _dtype_name(dtype),
        'quantization': model.quant_scheme,
        'warmup': warmup, 'repeats': repeats, 'torch': torch.__version__, 'python': platform.python_version(),
        'wall_s': round(time.perf_counter() - started, 1), 'max_spread': max_spread, 'retimed': sorted(retimed),
        'unstable': {str(i): s for i, s in sorted(unstable.items())},
    }
    card = model.card if model.card is not None else RouteCard.from_model(model)
    card = card.with_latency(key, stats, record)
    for stitch_id in unstable:
        entry = card.route(stitch_id)
        if entry is not None:
            entry.latency.pop(key, None)
    if unstable:
        warnings.warn(
            f'routes {sorted(unstable)} timed unstably on {key} (relative spread {unstable}, above max_spread='
            f'{max_spread:g}, after {retries} re-measurements): other load on the machine? Their latencies are not '
            'written; profile them again on a quieter machine (routes=...), with more repeats, or a larger '
            'max_spread', UnstableTimingWarning, stacklevel=2)
    model.load_card(card, batch_size=batch_size)
    if out is not None:
        card.save(out)
    return card
