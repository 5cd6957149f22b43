"""``timm-stitch serve --model MODEL``: serve a stitched network with Ray Serve under an SLO (``[serve]`` extra)."""
from __future__ import annotations

import argparse
import signal
import sys
import time

from ..arguments import float_in, int_at_least
from ._model import add_model_args, build_model


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser('serve', help='serve the model over HTTP with Ray Serve, routes chosen per request',
                              description='Start a Ray Serve application whose replicas answer JSON requests on '
                                          'POST /, each with the most accurate route that keeps every queued '
                                          "request's deadline (timm_stitch.slo). Weights: --checkpoint, else the "
                                          'pretrained ones. Without --address a local Ray bound to 127.0.0.1 is '
                                          'started. Needs pip install timm-stitch[serve].')
    add_model_args(p)
    p.add_argument('--slo-ms', type=float_in(1e-3), default=100.0,
                   help='deadline of requests that give no deadline_ms (default: 100)')
    p.add_argument('--reserve-ms', type=float_in(0.0), default=None,
                   help='plan every deadline this much early (default: a quarter of --slo-ms)')
    p.add_argument('--batch-sizes', type=int_at_least(1), nargs='+', default=[1, 8],
                   help='batch sizes served, each with a latency profile of the replica device (default: 1 8)')
    p.add_argument('--no-profile', action='store_true',
                   help='refuse to start when the card lacks a latency profile, instead of measuring it')
    p.add_argument('--replicas', type=int_at_least(1), default=1, help='replicas of the model (default: 1)')
    p.add_argument('--cpus-per-replica', type=float_in(0.01), default=1.0, help='CPUs per replica (default: 1)')
    p.add_argument('--address', default=None,
                   help='a running Ray cluster to join (e.g. auto); default: start a local Ray on 127.0.0.1')
    p.add_argument('--port', type=int_at_least(1, 65535), default=8000, help='HTTP port of a local Ray (default: 8000)')
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..ray_serve import build_app, start_local_ray

    args.pretrained = args.pretrained or args.checkpoint is None
    model = build_model(args)
    started = time.perf_counter()
    if args.address is None:
        start_local_ray(http_port=args.port)
    else:
        import ray
        ray.init(address=args.address)
    from ray import serve
    app = build_app(model, num_replicas=args.replicas, num_cpus=args.cpus_per_replica,
                    batch_sizes=args.batch_sizes, slo_ms=args.slo_ms, reserve_ms=args.reserve_ms,
                    profile_missing=not args.no_profile)
    serve.run(app, name='timm-stitch', route_prefix='/')
    print(f'serving {args.model} ({args.replicas} replica(s)) after {time.perf_counter() - started:.1f} s: POST '
          'JSON {"tensor" or "image", "deadline_ms", "route", "max_macs", "max_latency_ms", "min_top1"} to the '
          'Serve HTTP address (local: http://127.0.0.1:%d/); Ctrl-C stops' % args.port, flush=True)
    # SIGTERM (and SIGINT, which a background job ignores) end the command through the same clean shutdown
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            time.sleep(3600)
    finally:
        import ray
        serve.shutdown()
        ray.shutdown()
