"""A Ray Serve deployment of a stitched network: the in-process server core in every replica (``pip install
timm-stitch[serve]``).

Each replica builds the model, reads the latency profile of its own device from the card (measuring the missing
batch sizes at start-up with ``profile_missing``, so that replicas on other machines of a cluster use their own
latencies), and runs a :class:`~timm_stitch.server.StitchServer`. Requests reach it through Ray's request batching
(``serve.batch``) over HTTP (JSON, see :func:`~timm_stitch.server.parse_request`; a bad field answers 400 naming
it) or a Python handle (``handle.infer.remote(tensor=x, deadline_ms=50, route=3)``). Replicas scale with
``num_replicas`` (or Ray's autoscaling config): no code changes between a laptop and a cluster.

:func:`start_local_ray` starts Ray on this machine bound to 127.0.0.1 only (every Ray server, the HTTP proxy
included). Ray releases from 2.54 open an inter-deployment gRPC server on every interface in each replica, with no
setting to bind it to loopback (ray-project/ray#59908), hence the ``ray[serve]<2.54`` of the extra.
"""
from __future__ import annotations

import asyncio
import io
import os
import sys
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from .server import BadRequestError, StitchServer, parse_request
from .slo import MissingLatencyProfileError, NoRouteFitsError, RouteController, RouteTable

__all__ = ['StitchDeployment', 'build_app', 'start_local_ray', 'LOOPBACK_ENV']

#: set before Ray starts: node address 127.0.0.1 stays loopback (Ray otherwise swaps it for the machine's address)
LOOPBACK_ENV = {'RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER': '0', 'RAY_USAGE_STATS_ENABLED': '0'}


def start_local_ray(num_cpus: Optional[int] = None, http_port: int = 8000) -> None:
    """Start a single-machine Ray bound to 127.0.0.1 only, and Serve's HTTP proxy on ``127.0.0.1:http_port``.
    Must run before anything imports ``ray`` in this process (the address rule is read at import)."""
    if 'ray' in sys.modules:
        from ray._private import ray_constants
        if ray_constants.ENABLE_RAY_CLUSTER:
            raise RuntimeError('ray was imported before start_local_ray: set ' + ' '.join(
                f'{k}={v}' for k, v in LOOPBACK_ENV.items()) + ' in the environment to keep Ray on 127.0.0.1')
    os.environ.update(LOOPBACK_ENV)
    import ray
    from ray import serve
    ray.init(_node_ip_address='127.0.0.1', include_dashboard=False, num_cpus=num_cpus, configure_logging=False,
             log_to_driver=False)
    serve.start(http_options={'host': '127.0.0.1', 'port': http_port})


def _build_server(model: Union[str, torch.nn.Module], card: Optional[str], checkpoint: Optional[str],
                  batch_sizes: Sequence[int], slo_ms: Optional[float], profile_missing: bool,
                  profile_repeats: int, adapt: float, reserve_ms: Optional[float]) -> StitchServer:
    import timm

    from .model import StitchedNet
    from .profiling import profile

    if isinstance(model, str):
        model = timm.create_model(model, pretrained=checkpoint is None)
    if not isinstance(model, StitchedNet):
        raise ValueError(f'expected a stitched network (an snnet_* model), got {type(model).__name__}')
    if checkpoint is not None:
        from .evaluation import load_weights
        load_weights(model, checkpoint)
    if card is not None:
        model.load_card(card)
    model.eval()
    for b in batch_sizes:
        try:
            RouteTable.from_model(model, batch_sizes=(b,))
        except MissingLatencyProfileError:
            if not profile_missing:
                raise
            profile(model, batch_size=b, warmup=1, repeats=profile_repeats, progress=False)
    table = RouteTable.from_model(model, batch_sizes=batch_sizes)
    if reserve_ms is None:
        reserve_ms = slo_ms / 4 if slo_ms else 0.0
    return StitchServer(model, RouteController(table, adapt=adapt, reserve_ms=reserve_ms), slo_ms=slo_ms).start()


def _to_json(result: Any) -> dict[str, Any]:
    logits = result.logits
    return {'route': result.route, 'class': int(logits.argmax()), 'logits': logits.tolist(),
            'latency_ms': round(result.latency_ms, 3), 'deadline_ms': result.deadline_ms,
            'met_deadline': result.met_deadline}


class StitchDeployment:
    """The replica: a :class:`StitchServer` behind Ray's request batching (see the module docstring).

    Args:
        model: A registered snnet_* name (built in the replica, pretrained weights unless ``checkpoint``) or a model.
        card: A routes.json card to load (default: the model's own).
        checkpoint: Weights to load.
        batch_sizes: The batch sizes to serve; the card's latency profiles of the replica's device at each are used.
        slo_ms: The deadline of requests that give none.
        profile_missing: Measure missing latency profiles at start-up (else refuse to start, naming them).
        profile_repeats: Timed calls per route when profiling.
        adapt: How fast the controller follows observed batch times (see :class:`RouteController`).
        reserve_ms: Time by which the controller plans every deadline early (default: a quarter of ``slo_ms``,
            as ``benchmarks/bench_slo.py`` measured; see :class:`RouteController`).
    """

    def __init__(self, model: Union[str, torch.nn.Module], card: Optional[str] = None,
                 checkpoint: Optional[str] = None, batch_sizes: Sequence[int] = (1, 8),
                 slo_ms: Optional[float] = 100.0, profile_missing: bool = True, profile_repeats: int = 5,
                 adapt: float = 0.2, reserve_ms: Optional[float] = None):
        from timm.data import create_transform, resolve_data_config

        from .evaluation import image_mode
        from .input_size import model_input_size

        self.server = _build_server(model, card, checkpoint, batch_sizes, slo_ms, profile_missing, profile_repeats,
                                    adapt, reserve_ms)
        net = self.server.model
        self.input_size = tuple(model_input_size(net))
        preprocess = create_transform(**resolve_data_config({}, model=net), is_training=False)
        mode = image_mode(net.in_chans)

        def transform(data: bytes) -> torch.Tensor:
            from PIL import Image
            return preprocess(Image.open(io.BytesIO(data)).convert(mode))

        self.transform = transform

    def _parse(self, payload: Mapping[str, Any]):
        x, deadline_ms, bounds = parse_request(payload, self.input_size, self.transform)
        try:
            self.server.controller.allowed(bounds)
        except NoRouteFitsError as e:
            raise BadRequestError(e.field, str(e)) from None
        return x, deadline_ms, bounds

    async def _batched(self, requests: list[tuple]) -> list[dict[str, Any]]:
        """Ray's batch of parsed requests, queued together in the core; answers in order."""
        futures = [asyncio.wrap_future(self.server.submit(x, d, b)) for x, d, b in requests]
        return [_to_json(r) for r in await asyncio.gather(*futures)]

    async def infer(self, **payload: Any) -> dict[str, Any]:
        """The Python handle API: the fields of an HTTP request as keyword arguments (``tensor`` may be a tensor).
        Raises :class:`BadRequestError` naming a bad field."""
        return await self._batched_call(self._parse(payload))

    async def __call__(self, request: Any) -> Any:
        """The HTTP API: a JSON body (see :func:`~timm_stitch.server.parse_request`); 400 naming a bad field."""
        from starlette.responses import JSONResponse
        try:
            payload = await request.json()
        except ValueError as e:
            return JSONResponse({'error': f'body: not JSON ({e})', 'field': 'body'}, status_code=400)
        try:
            parsed = self._parse(payload)
        except BadRequestError as e:
            return JSONResponse({'error': str(e), 'field': e.field}, status_code=400)
        return await self._batched_call(parsed)

    def metrics(self) -> dict[str, Any]:
        """The replica's counters (see :meth:`StitchServer.metrics`) and its process id."""
        return {**self.server.metrics(), 'pid': os.getpid()}


def _deployment_class(max_batch_size: int, batch_wait_timeout_s: float):
    from ray import serve

    class BatchedStitchDeployment(StitchDeployment):
        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s)
        async def _batched_call(self, requests: list[tuple]) -> list[dict[str, Any]]:
            return await self._batched(requests)

    return serve.deployment(BatchedStitchDeployment, name='StitchDeployment')


def build_app(model: Union[str, torch.nn.Module], num_replicas: Union[int, str] = 1, num_cpus: float = 1,
              max_batch_size: int = 16, batch_wait_timeout_s: float = 0.002, **kwargs: Any) -> Any:
    """The Serve application for ``model`` (``serve.run(build_app('snnet_vit_fmnist_tsb'))``): ``num_replicas``
    replicas (``'auto'``: Ray's autoscaling) of ``num_cpus`` each; ``kwargs`` go to the replica (see
    :class:`StitchDeployment`)."""
    deployment = _deployment_class(max_batch_size, batch_wait_timeout_s)
    return deployment.options(num_replicas=num_replicas, ray_actor_options={'num_cpus': num_cpus}).bind(
        model, **kwargs)
