"""Serving under a bursty load: the SLO route controller against each fixed route of the front.

An open-loop trace (Poisson arrivals, fixed seed) whose rate steps between a low rate and several times what the
most accurate served route sustains is submitted in real time to the in-process server core
(:class:`timm_stitch.server.StitchServer`, the same core each Ray Serve replica runs; no network), once per policy:
each fixed route of the card's MACs/top-1 front (a controller whose table holds that route alone: same queue, same
batching) and the controller over all of them. Per policy: SLO attainment, mean card top-1 of the answers, p50/p99
latency. Memory: the weights one deployment of every route holds (anchors and stitches once) against one deployment
per front route (the sum of each route's own weights). Latency of the served routes is profiled here first
(``timm_stitch.profile``, a few batch sizes).

    python benchmarks/bench_slo.py --model fmnist --rounds 3    # every policy 3 times in turn; the medians
    python benchmarks/bench_slo.py --model deit --duration 30 --high 5 --adapt 0.5 --grace 8 --rounds 3
        # full-size DeiT-Ti/S/B, the reported card on random weights

Requests not answered ``--grace`` seconds after the trace ends count as missed (the fixed large routes' backlog); the
rest of a backlog is cancelled then, so that each policy has the process to itself.
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import timm
import torch
from _timing import setup_torch

from timm_stitch.input_size import model_input_size
from timm_stitch.profiling import profile
from timm_stitch.server import StitchServer
from timm_stitch.slo import RouteController, RouteTable

REPORTED = Path(__file__).resolve().parents[1] / 'timm_stitch' / 'data' / 'reported' / 'snnet_deit_tsb.routes.json'
MODELS = {'fmnist': dict(batch_sizes=(1, 8, 32), duration=12.0),
          'deit': dict(batch_sizes=(1, 4), duration=16.0)}


def load_model(name: str) -> torch.nn.Module:
    if name == 'fmnist':
        return timm.create_model('snnet_vit_fmnist_tsb', pretrained=True).eval()
    model = timm.create_model('snnet_deit_tsb', final_norm_on_stitched_routes=False).eval()
    with warnings.catch_warnings():  # the reported card names no weights: keyed to these (random) ones on purpose
        warnings.simplefilter('ignore')
        model.load_card(str(REPORTED))
    return model


def served_routes(model, count: int) -> list[int]:
    """``count`` routes of the card's MACs/top-1 front, evenly spread from the cheapest to the most accurate."""
    front = [r.id for r in model.pareto('macs', 'top1')]
    picks = np.unique(np.round(np.linspace(0, len(front) - 1, min(count, len(front)))).astype(int))
    return [front[i] for i in picks]


def trace(rate_low: float, rate_high: float, duration: float, seed: int) -> tuple[np.ndarray, list]:
    """Arrival times (s) of Poisson arrivals whose rate steps low, high, low, high, low (fifths of ``duration``)."""
    rng = np.random.default_rng(seed)
    steps = [(rate_low if k % 2 == 0 else rate_high, duration * (k + 1) / 5) for k in range(5)]
    times, t = [], 0.0
    for rate, end in steps:
        while (t := t + rng.exponential(1 / rate)) < end:
            times.append(t)
        t = end
    return np.array(times), steps


def run_policy(model, controller: RouteController, images: torch.Tensor, arrivals: np.ndarray, slo_ms: float,
               grace: float) -> dict:
    """Submit ``images[i]`` at ``arrivals[i]`` (open loop) and collect each answer's route and latency."""
    batches: list = []
    server = StitchServer(model, controller, slo_ms=slo_ms, on_batch=batches.append).start()
    futures = [None] * len(arrivals)
    start = time.monotonic()
    for i, at in enumerate(arrivals):
        delay = start + at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        futures[i] = server.submit(images[i % len(images)])
    deadline = start + arrivals[-1] + grace
    answers = []
    for f in futures:
        try:
            answers.append(f.result(timeout=max(deadline - time.monotonic(), 0.0)))
        except TimeoutError:
            answers.append(None)
    metrics = server.metrics()
    server.stop(cancel=True)  # a backlog left draining would slow the next policy down
    return {'answers': answers, 'metrics': metrics, 'arrivals': arrivals, 'batches': list(batches), 'start': start}


def summarise(result: dict, table: RouteTable) -> dict:
    answered = [a for a in result['answers'] if a is not None]
    latency = np.array([a.latency_ms for a in answered]) if answered else np.array([np.nan])
    return {'requests': len(result['answers']), 'answered': len(answered),
            'slo_attainment': sum(a.met_deadline for a in answered) / len(result['answers']),
            'mean_top1': float(np.mean([table.routes[a.route].top1 for a in answered])) if answered else None,
            'p50_ms': float(np.percentile(latency, 50)), 'p99_ms': float(np.percentile(latency, 99)),
            'routes': result['metrics']['routes'], 'max_queue': result['metrics']['max_queue_length']}


def batch_stats(result: dict) -> dict:
    """How the server ran the trace: batches, mean size, planning ms, run time over the controller's estimate
    (stalls: over 2.5x), requests taken as hopeless, the highest latency scale."""
    records = [r for r in result['batches'] if r.plan.take]
    if not records:
        return {}
    ratio = np.array([r.run_ms / r.plan.est_ms for r in records])
    plan_ms = np.array([r.plan_ms for r in records])
    return {'batches': len(records), 'mean_batch': float(np.mean([len(r.plan.take) for r in records])),
            'plan_ms_p50': float(np.median(plan_ms)), 'plan_ms_max': float(plan_ms.max()),
            'run_over_est_p50': float(np.median(ratio)), 'run_over_est_p99': float(np.percentile(ratio, 99)),
            'stalls': int((ratio > 2.5).sum()), 'hopeless': sum(r.plan.feasible.count(False) for r in records),
            'max_scale': max(r.scale for r in records)}


def batch_log(path: Path, result: dict) -> None:
    """One JSON line per batch: seconds into the trace, queue length, planning ms, routes, estimate, run ms,
    scale, requests taken as hopeless."""
    with open(path, 'w') as f:
        for r in result['batches']:
            f.write(json.dumps({'t': r.planned - result['start'], 'queue': r.queue_length, 'plan_ms': r.plan_ms,
                                'routes': list(r.plan.routes), 'est_ms': r.plan.est_ms, 'run_ms': r.run_ms,
                                'scale': r.scale, 'hopeless': r.plan.feasible.count(False)}) + '\n')


def weights_memory(model, front: list[int]) -> dict:
    """Bytes of the weights one all-route deployment holds vs the sum over one deployment per front route."""
    itemsize = next(model.parameters()).element_size()
    shared = sum(p.numel() for p in model.parameters()) * itemsize
    per_route = sum(model.counted_routes()[i].params for i in front) * itemsize
    return {'one_deployment_mb': shared / 2 ** 20, 'per_route_deployments_mb': per_route / 2 ** 20,
            'ratio': per_route / shared, 'front_routes': len(front)}


def plot(path: Path, result: dict, table: RouteTable, steps: list, title: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(9, 3.6))
    done = [(t, a) for t, a in zip(result['arrivals'], result['answers']) if a is not None]
    ax.scatter([t for t, _ in done], [table.routes[a.route].top1 for _, a in done], s=6,
               c=['tab:blue' if a.met_deadline else 'tab:red' for _, a in done])
    ax.set_xlabel('arrival time (s)')
    ax.set_ylabel('card top-1 of the route that answered (%)')
    rate = ax.twinx()
    edges = [0.0] + [end for _, end in steps]
    rate.step(edges, [steps[0][0]] + [r for r, _ in steps], where='pre', color='grey', alpha=0.6)
    rate.set_ylabel('arrival rate (requests/s)')
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f'wrote {path}')


def bench(name: str, args: argparse.Namespace) -> dict:
    cfg = MODELS[name]
    duration = args.duration or cfg['duration']
    model = load_model(name)
    ids = served_routes(model, args.routes)
    started = time.perf_counter()
    for b in cfg['batch_sizes']:
        # timings spread by the other load are kept (max_spread=None): the trace runs under that same load
        profile(model, batch_size=b, routes=ids, warmup=1, repeats=args.repeats, progress=False, max_spread=None)
    print(f'{name}: profiled {len(ids)} routes at batch sizes {cfg["batch_sizes"]} in '
          f'{time.perf_counter() - started:.0f} s')
    table = RouteTable.from_model(model, cfg['batch_sizes'], routes=ids, statistic=args.statistic)
    big, bmax = max(ids, key=lambda i: table.routes[i].top1), table.max_batch_size
    capacity = bmax / table.latency(big, bmax) * 1e3
    slo_ms = args.slo_factor * table.latency(big, bmax)
    arrivals, steps = trace(args.low * capacity, args.high * capacity, duration, args.seed)
    images = torch.randn(64, *model_input_size(model), generator=torch.Generator().manual_seed(0))
    print(f'{name}: routes {ids}; largest {big} sustains {capacity:.1f} req/s at batch {bmax}; SLO {slo_ms:.1f} ms; '
          f'{len(arrivals)} requests over {duration:.0f} s at {args.low:g}x / {args.high:g}x that rate')
    print(f'{name}: req/s each route sustains at batch {bmax} by its profile: '
          + ', '.join(f'{i} {bmax / table.latency(i, bmax) * 1e3:.0f}' for i in ids))
    # a fixed route is a controller whose table holds that route alone, planning as the controller does (the same
    # margin, adaptation to observed batches and reserve): only the choice of route differs
    options = dict(margin_ms=args.margin_ms, adapt=args.adapt, reserve_ms=args.reserve * slo_ms)
    policies = [(f'route {i}', RouteTable([table.routes[i]])) for i in ids] + [('controller', table)]
    if args.policies:
        keep = {f'route {x}' if x.isdigit() else x for x in args.policies.split(',')}
        unknown = sorted(keep - {label for label, _ in policies})
        if unknown:
            raise SystemExit(f'--policies: {", ".join(unknown)} not among the served policies (route ids '
                             f'{", ".join(map(str, ids))} and controller)')
        policies = [(label, served) for label, served in policies if label in keep]
    rounds: dict[str, list] = {label: [] for label, _ in policies}
    controller_runs = []
    for k in range(args.rounds):
        if args.rounds > 1:
            print(f'  round {k + 1} of {args.rounds}', flush=True)
        for label, served in policies:  # a fresh controller each round: no scale carried over
            result = run_policy(model, RouteController(served, **options), images, arrivals, slo_ms, args.grace)
            row = {**summarise(result, table), 'server': batch_stats(result)}
            rounds[label].append(row)
            if args.batch_log:
                batch_log(Path(args.batch_log) / f'batches_{name}_{label.replace(" ", "")}_{k + 1}.jsonl', result)
            if label == 'controller':
                controller_runs.append((row['slo_attainment'], result))
            print_row(label, row)
    rows = {label: median_row(runs) for label, runs in rounds.items()}
    if args.rounds > 1:
        print(f'  median of {args.rounds} rounds:')
        for label, row in rows.items():
            print_row(label, row, detail=False)
    front = [r.id for r in model.pareto('macs', 'top1')]
    memory = weights_memory(model, front)
    print(f'  memory: one deployment {memory["one_deployment_mb"]:.1f} MB of weights vs one per front route '
          f'({len(front)} routes) {memory["per_route_deployments_mb"]:.1f} MB = {memory["ratio"]:.2f}x')
    if args.plot_dir and controller_runs:  # the controller's round of median attainment
        ranked = sorted(controller_runs, key=lambda run: run[0])
        plot(Path(args.plot_dir) / f'serving_routes_{name}.png', ranked[(len(ranked) - 1) // 2][1], table, steps,
             f'{name}: controller route choices (red: missed the {slo_ms:.0f} ms SLO) and arrival rate')
    return {'routes': ids, 'slo_ms': slo_ms, 'capacity_rps': capacity, 'requests': len(arrivals), 'policies': rows,
            'rounds': rounds, 'memory': memory, 'batch_sizes': cfg['batch_sizes'], 'duration_s': duration}


def median_row(runs: list[dict]) -> dict:
    """Per figure, the median over rounds (one round: that round's row)."""
    if len(runs) == 1:
        return runs[0]
    keys = ('slo_attainment', 'mean_top1', 'p50_ms', 'p99_ms')
    return {k: float(np.median([r[k] for r in runs if r[k] is not None])) for k in keys} | {
        'requests': runs[0]['requests'], 'answered': int(np.median([r['answered'] for r in runs])),
        'max_queue': int(np.median([r['max_queue'] for r in runs])), 'server': {},
        'attainment_each': [r['slo_attainment'] for r in runs], 'top1_each': [r['mean_top1'] for r in runs]}


def print_row(label: str, r: dict, detail: bool = True) -> None:
    top1 = f'{r["mean_top1"]:.2f}' if r['mean_top1'] is not None else '-'
    print(f'  {label:<11} SLO {100 * r["slo_attainment"]:6.1f} %  top1 {top1:>6}  p50 {r["p50_ms"]:8.1f} ms  '
          f'p99 {r["p99_ms"]:8.1f} ms  answered {r["answered"]}/{r["requests"]}  max queue {r["max_queue"]}',
          flush=True)
    if 'attainment_each' in r:
        print(f'  {"":<11} each round: ' + ', '.join(f'{100 * a:.1f} %' for a in r['attainment_each']))
    b = r['server']
    if detail and b:
        print(f'  {"":<11} {b["batches"]} batches of {b["mean_batch"]:.1f}, planning p50 {b["plan_ms_p50"]:.2f} '
              f'max {b["plan_ms_max"]:.1f} ms, run/estimate p50 {b["run_over_est_p50"]:.2f} p99 '
              f'{b["run_over_est_p99"]:.2f}, {b["stalls"]} stalls (>2.5x), {b["hopeless"]} hopeless, '
              f'scale max {b["max_scale"]:.2f}', flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--model', choices=[*MODELS, 'both'], default='both')
    p.add_argument('--routes', type=int, default=8, help='front routes served (default: 8)')
    p.add_argument('--duration', type=float, default=None, help='trace seconds (default: per model)')
    p.add_argument('--low', type=float, default=0.3, help='low rate, times the largest route capacity')
    p.add_argument('--high', type=float, default=3.0, help='burst rate, times the largest route capacity')
    p.add_argument('--slo-factor', type=float, default=2.0,
                   help='SLO, times the largest route latency at the largest batch (default: 2)')
    p.add_argument('--margin-ms', type=float, default=1.0, help='per-batch overhead the controller adds')
    p.add_argument('--adapt', type=float, default=0.2, help="controller's weight of each observed batch (0: card only)")
    p.add_argument('--reserve', type=float, default=0.25,
                   help="controller's reserve, times the SLO: it plans every deadline that much early (a stall's "
                        'room)')
    p.add_argument('--grace', type=float, default=3.0, help='seconds after the trace before counting misses')
    p.add_argument('--repeats', type=int, default=5, help='profiling repeats per route and batch size')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--threads', type=int, default=1,
                   help='torch threads (default: 1; 2 oversubscribe a shared 2-core machine)')
    p.add_argument('--statistic', choices=('median_ms', 'p90_ms'), default='median_ms',
                   help='profiled latency the controller reads')
    p.add_argument('--plot-dir', default=None, help='write serving_routes_<model>.png here')
    p.add_argument('--json', default=None, help='write the figures here')
    p.add_argument('--policies', default=None,
                   help='comma-separated route ids and/or "controller" to run (default: every front route and the '
                        'controller)')
    p.add_argument('--rounds', type=int, default=1,
                   help='run every policy this many times, in turn, on the same trace and SLO; report the medians')
    p.add_argument('--batch-log', default=None, help='write each policy\'s batches (JSON lines) into this folder')
    args = p.parse_args()
    if args.rounds < 1:
        p.error(f'--rounds must be >= 1, got {args.rounds}')
    for option, folder in (('--batch-log', args.batch_log), ('--plot-dir', args.plot_dir)):
        try:  # made now: a path that cannot be a folder fails before any run
            if folder:
                Path(folder).mkdir(parents=True, exist_ok=True)
        except OSError as error:
            p.error(f'{option} {folder}: cannot be a folder ({error.strerror})')
    setup_torch(args.threads)
    names = list(MODELS) if args.model == 'both' else [args.model]
    out = {name: bench(name, args) for name in names}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
        print(f'wrote {args.json}')


if __name__ == '__main__':
    main()
