"""An in-process server for one stitched network: a request queue, dynamic mixed-route batches, an SLO controller.

:class:`StitchServer` queues requests (an image tensor, an optional deadline and optional :class:`Bounds`); one
worker thread repeatedly asks the :class:`~timm_stitch.slo.RouteController` for the next batch and its routes and
runs it as one mixed-route batch (:func:`timm_stitch.serving.mixed_forward`, shared prefixes included). Each request
gets a :class:`Result`: its logits, the route that answered, its latency and whether it met its deadline.
:meth:`StitchServer.metrics` reports the route histogram, SLO attainment and queue length. No Ray needed; the Ray
Serve deployment (:mod:`timm_stitch.ray_serve`) runs this same core in each replica.
"""
from __future__ import annotations

import base64
import gc
import math
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from .input_size import model_input_size
from .serving import mixed_forward
from .slo import Arrivals, Bounds, Pending, Plan, RouteController, finite_non_negative

if TYPE_CHECKING:
    from .model import StitchedNet

__all__ = ['StitchServer', 'Result', 'BatchRecord', 'BadRequestError', 'parse_request', 'REQUEST_FIELDS']


@dataclass(frozen=True)
class Result:
    """One answered request: logits (on the CPU), the route that answered, the latency from submission to answer,
    the deadline it had (ms after submission, None: none) and whether it met it."""
    logits: torch.Tensor
    route: int
    latency_ms: float
    deadline_ms: Optional[float]
    met_deadline: bool


@dataclass(frozen=True)
class BatchRecord:
    """One batch the worker ran, for watching the controller under load: when it was planned (seconds on the
    server's clock), the queue length then, the milliseconds planning took, the plan (routes, estimate, which
    requests were still feasible), the milliseconds the batch ran and the controller's ``scale`` after it."""
    planned: float
    queue_length: int
    plan_ms: float
    plan: Plan
    run_ms: float
    scale: float


@dataclass
class _Request:
    x: torch.Tensor
    submitted: float
    deadline_ms: Optional[float]
    bounds: Bounds
    future: Future
    pending: Pending = field(init=False)  # as the controller sees it; made once (a backlog is planned every batch)

    def __post_init__(self) -> None:
        deadline = float('inf') if self.deadline_ms is None else self.submitted + self.deadline_ms / 1e3
        self.pending = Pending(deadline, self.bounds)


class _GcFreeze:
    """The servers holding Python's collector frozen (``freeze_gc``): frozen at each one's start, unfrozen when the
    last one stops."""
    lock, holders = threading.Lock(), 0

    @classmethod
    def hold(cls) -> None:
        with cls.lock:
            gc.collect()
            gc.freeze()
            cls.holders += 1

    @classmethod
    def release(cls) -> None:
        with cls.lock:
            cls.holders -= 1
            if not cls.holders:
                gc.unfreeze()


class StitchServer:
    """Serves ``model`` under ``controller``'s route choices (see the module docstring).

    Args:
        model: The stitched network (put in eval mode; its device and dtype are those the controller's latencies
            were profiled on).
        controller: Chooses each batch and its routes.
        slo_ms: The deadline of requests that give none (None: no deadline; they run the most accurate route).
        clock: Seconds, monotonic (``time.monotonic``); deadlines are read on it.
        on_batch: Called with a :class:`BatchRecord` after each batch (in the worker thread; keep it short).
        rate_window_s: The arrival rate the controller plans for (:class:`~timm_stitch.slo.Arrivals`, under
            ``slo_ms``) is the count of requests submitted in the last ``rate_window_s`` seconds over it; 0: plan
            for the queue alone.
        freeze_gc: At :meth:`start`, collect garbage once and move every object then alive in the process to
            Python's permanent generation (``gc.freeze``) until the last server that did so stops (``gc.unfreeze``).
            Without it, a full collection scans torch's, timm's and the model's objects (about 400,000 with the
            Fashion-MNIST release) and holds every thread for about 250 ms here, several times the SLO's room;
            with it a full collection scans only what was made while serving. Frozen objects are still freed by
            reference counting, but a cycle among them waits for the unfreeze.
    """

    def __init__(self, model: StitchedNet, controller: RouteController, slo_ms: Optional[float] = None,
                 clock: Callable[[], float] = time.monotonic,
                 on_batch: Optional[Callable[[BatchRecord], None]] = None, rate_window_s: float = 1.0,
                 freeze_gc: bool = True):
        if slo_ms is not None and not slo_ms > 0:
            raise ValueError(f'slo_ms must be > 0 or None, got {slo_ms!r}')
        finite_non_negative('rate_window_s', rate_window_s)
        self.model, self.controller, self.slo_ms, self.clock = model.eval(), controller, slo_ms, clock
        self.on_batch, self.freeze_gc, self.rate_window_s = on_batch, freeze_gc, rate_window_s
        self._submitted: deque[float] = deque()  # submission times within the last rate_window_s
        self._param = next(model.parameters())
        self._input_size = tuple(model_input_size(model))
        self._queue: list[_Request] = []
        self._cv = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._stop = False
        self._routes: Counter = Counter()
        self._served = self._met = self._with_deadline = self._batches = self._max_queue = 0

    # ---- requests ----------------------------------------------------------------------------------------------

    def submit(self, x: torch.Tensor, deadline_ms: Optional[float] = None, bounds: Optional[Bounds] = None) -> Future:
        """Queue one image ``x`` (C, H, W) and return a future of its :class:`Result`. ``deadline_ms``: its latency
        budget from now (default: the server's ``slo_ms``). Raises ``ValueError``/``TypeError`` naming the bad
        argument (a wrong image shape, a bound no route meets) before anything is queued."""
        if not isinstance(x, torch.Tensor) or x.ndim != 3:
            raise ValueError(f'x must be one image tensor (C, H, W), got {type(x).__name__} '
                             f'{tuple(getattr(x, "shape", ()))}')
        if tuple(x.shape) != self._input_size:
            raise ValueError(f'x has shape {tuple(x.shape)}, the model takes images of shape {self._input_size}')
        if deadline_ms is None:
            deadline_ms = self.slo_ms
        elif isinstance(deadline_ms, bool) or not isinstance(deadline_ms, (int, float)) or not deadline_ms > 0:
            raise ValueError(f'deadline_ms must be a number > 0, got {deadline_ms!r}')
        bounds = Bounds() if bounds is None else bounds
        self.controller.allowed(bounds)  # refuse now a bound no route meets
        request = _Request(x.to(self._param.device, self._param.dtype), self.clock(), deadline_ms, bounds, Future())
        with self._cv:
            if self._stop:
                raise RuntimeError('the server is stopped')
            self._queue.append(request)
            self._submitted.append(request.submitted)
            self._max_queue = max(self._max_queue, len(self._queue))
            self._cv.notify()
        return request.future

    # ---- the worker --------------------------------------------------------------------------------------------

    def start(self) -> StitchServer:
        """Start the worker thread (idempotent); returns the server."""
        with self._cv:
            self._stop = False
            if self._thread is not None:
                return self
            self._thread = thread = threading.Thread(target=self._loop, name='timm-stitch-server', daemon=True)
        if self.freeze_gc:  # outside the lock: the collection takes a quarter of a second, submit() need not wait
            _GcFreeze.hold()
        thread.start()
        return self

    def stop(self, cancel: bool = False) -> None:
        """Serve what is queued, then stop the worker thread. ``cancel``: stop after the batch running now, the
        queued requests' futures cancelled (a backlog left behind would go on taking the machine)."""
        with self._cv:
            self._stop = True
            if cancel:
                for r in self._queue:
                    r.future.cancel()
                self._queue = []
            self._cv.notify()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
            if self.freeze_gc:  # a started server holds the collector frozen
                _GcFreeze.release()

    def __enter__(self) -> StitchServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stop:
                    self._cv.wait()
                if not self._queue:
                    return
            self.step()

    def step(self) -> int:
        """Plan and run one batch from the queue now (the worker's unit of work; callable directly when no worker
        runs, e.g. in tests); returns how many requests it answered."""
        with self._cv:
            queue = list(self._queue)
            if not queue:
                return 0
            planned = self.clock()
            plan = self.controller.plan([r.pending for r in queue], planned, self._arrivals(planned))
            taken = [queue[i] for i in plan.take]
            chosen = set(plan.take)
            self._queue = [r for i, r in enumerate(queue) if i not in chosen]
        started = self.clock()
        plan_ms = (started - planned) * 1e3
        try:
            with torch.inference_mode():
                logits = mixed_forward(self.model, torch.stack([r.x for r in taken]), list(plan.routes)).float().cpu()
        except Exception as error:  # an answer for every request taken, even when the batch fails
            for r in taken:
                r.future.set_exception(error)
            return 0
        done = self.clock()
        self.controller.observe(plan, (done - started) * 1e3)
        results = []
        for r, route, row in zip(taken, plan.routes, logits):
            latency = (done - r.submitted) * 1e3
            met = r.deadline_ms is None or latency <= r.deadline_ms
            results.append((r, Result(row, route, latency, r.deadline_ms, met)))
        with self._cv:
            self._batches += 1
            for r, result in results:
                self._served += 1
                self._routes[result.route] += 1
                if r.deadline_ms is not None:
                    self._with_deadline += 1
                    self._met += result.met_deadline
        for r, result in results:
            r.future.set_result(result)
        if self.on_batch is not None:
            run_ms = (done - started) * 1e3
            self.on_batch(BatchRecord(planned, len(queue), plan_ms, plan, run_ms, self.controller.scale))
        return len(results)

    def _arrivals(self, now: float) -> Optional[Arrivals]:
        """The arrivals to plan for: the last ``rate_window_s`` seconds' rate under the server's deadline."""
        while self._submitted and self._submitted[0] <= now - self.rate_window_s:
            self._submitted.popleft()
        if self.slo_ms is None or not self.rate_window_s or not self._submitted:
            return None
        return Arrivals(len(self._submitted) / self.rate_window_s, self.slo_ms / 1e3)

    # ---- metrics -----------------------------------------------------------------------------------------------

    def metrics(self) -> dict[str, Any]:
        """Counters since start: requests served, batches, requests per route, SLO attainment (met / served with
        a deadline; None before any), queue length now and its maximum."""
        with self._cv:
            return {'served': self._served, 'batches': self._batches, 'routes': dict(sorted(self._routes.items())),
                    'slo_attainment': self._met / self._with_deadline if self._with_deadline else None,
                    'queue_length': len(self._queue), 'max_queue_length': self._max_queue}


# ---- requests from outside (HTTP JSON, Python handles) ------------------------------------------------------------

class BadRequestError(ValueError):
    """A request field is missing, unknown or out of range; ``field`` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f'{field}: {message}')
        self.field = field


#: what a request may hold besides the image: the deadline and the bounds (see :class:`Bounds`)
REQUEST_FIELDS = ('image', 'tensor', 'deadline_ms', 'route', 'max_macs', 'max_latency_ms', 'min_top1')


def parse_request(payload: Any, input_size: tuple[int, ...], transform: Optional[Callable[[bytes], torch.Tensor]]
                  = None) -> tuple[torch.Tensor, Optional[float], Bounds]:
    """``(image tensor, deadline_ms, bounds)`` from a request mapping: exactly one of ``tensor`` (a (C, H, W)
    tensor or nested list of numbers, preprocessed) or ``image`` (an encoded image file as bytes or base64 text,
    preprocessed with ``transform``), optional ``deadline_ms`` (> 0) and the optional bounds ``route``,
    ``max_macs``, ``max_latency_ms``, ``min_top1``. Raises :class:`BadRequestError` naming the first bad field."""
    if not isinstance(payload, dict):
        raise BadRequestError('body', f'expected a JSON object with fields {", ".join(REQUEST_FIELDS)}, got '
                                      f'{type(payload).__name__}')
    unknown = sorted(set(payload) - set(REQUEST_FIELDS))
    if unknown:
        raise BadRequestError(unknown[0], f'unknown field (expected: {", ".join(REQUEST_FIELDS)})')
    given = [k for k in ('image', 'tensor') if payload.get(k) is not None]
    if len(given) != 1:
        raise BadRequestError('image', 'give exactly one of image (an encoded image file, base64) or tensor '
                                       f'(a preprocessed {list(input_size)} array), got {given or "neither"}')
    if given[0] == 'tensor':
        try:
            x = torch.as_tensor(payload['tensor'], dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as e:
            raise BadRequestError('tensor', f'not an array of numbers ({e})') from None
    else:
        if transform is None:
            raise BadRequestError('image', 'this server takes preprocessed tensors only')
        try:
            x = transform(_image_bytes(payload['image']))
        except (TypeError, ValueError, OSError) as e:
            raise BadRequestError('image', f'not a readable image file ({e})') from None
    if tuple(x.shape) != tuple(input_size) or not torch.isfinite(x).all():
        raise BadRequestError(given[0], f'expected a finite array of shape {list(input_size)}, got shape '
                                        f'{list(x.shape)}')
    numbers = {}
    for name in ('deadline_ms', 'max_macs', 'max_latency_ms', 'min_top1'):
        value = payload.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or (name != 'min_top1' and value <= 0)):
            raise BadRequestError(name, f'expected a {"finite" if name == "min_top1" else "positive"} number, '
                                        f'got {value!r}')
        numbers[name] = value
    route = payload.get('route')
    if route is not None and (isinstance(route, bool) or not isinstance(route, int)):
        raise BadRequestError('route', f'expected an integer route id, got {route!r}')
    deadline = numbers.pop('deadline_ms')
    return x, deadline, Bounds(route=route, **numbers)


def _image_bytes(value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return base64.b64decode(value, validate=True)
    raise TypeError(f'expected bytes or base64 text, got {type(value).__name__}')
