"""Zoo coverage: which timm families ``timm_stitch.stitch`` assembles, checked route by route, and cross-family pairs.

A family is a timm model module with at least two pretrained sizes of one model class at one input size
(``tests/zoo_families.py``: :func:`zoo_families`, from timm's registry). Per family the two smallest anchors are
stitched: structure and MACs per route at their real size on the meta device; the forward checks (anchor routes
bit-exact with timm's models in eval mode, every route forward and backward in one mixed-route batch) on the
family's tiny configuration (``zoo_families.TINY``, the tests' table). Each family runs in its own process with a
time limit; a crash or a time-out is a row of the table, never the end of the sweep.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import re
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, NamedTuple, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'tests'))
from zoo_families import CROSS_PAIRS, TINY, check_net, zoo_families  # noqa: E402

import timm_stitch  # noqa: E402
from timm_stitch.macs import count_route_macs  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / 'docs' / 'zoo.md'
START, END = '<!-- zoo-coverage:start -->', '<!-- zoo-coverage:end -->'
#: cross-family pairs are checked forward at this input size (their anchors built with it where they take one)
CROSS_IMG = 224


class Row(NamedTuple):
    """One family's or pair's outcome: a stitched network's checks, or why it is refused or failed."""
    name: str
    anchors: tuple[str, ...]
    routes: Optional[int] = None
    bit_exact: Optional[bool] = None
    fwd_bwd: Optional[bool] = None
    macs: Optional[tuple[int, int]] = None  # (smallest, largest) route at real size
    error: str = ''  # the exception (type: message) or what failed
    seconds: float = 0.0
    refused: bool = False  # the error is a refusal: a TypeError or ValueError

    @property
    def stitched(self) -> bool:
        return not self.error and bool(self.bit_exact) and bool(self.fwd_bwd)


def _failed(name: str, anchors: tuple[str, ...], exc: BaseException, start: float) -> Row:
    return Row(name, anchors, error=f'{type(exc).__name__}: {" ".join(str(exc).split())}',
               seconds=time.perf_counter() - start, refused=isinstance(exc, (TypeError, ValueError)))


def meta_structure(anchors: list[Any], **kwargs: Any) -> tuple[int, tuple[int, int]]:
    """Route count and the (smallest, largest) route MACs of the anchors stitched at their real size, on meta."""
    model = timm_stitch.stitch(anchors, device='meta', **kwargs)
    macs = count_route_macs(model)
    if not all(m > 0 for m in macs):
        raise ValueError(f'MACs not counted for routes {[i for i, m in enumerate(macs) if m <= 0]}')
    return model.num_routes, (min(macs), max(macs))


def check_family(name: str, anchors: tuple[str, str]) -> Row:
    """The checks of one family: real-size structure and MACs on meta, forward checks on its tiny configuration."""
    start = time.perf_counter()
    try:
        tiny = TINY.get(name)
        routes, macs = meta_structure(tiny.real_specs() if tiny is not None else list(anchors))
        if tiny is None:
            torch.manual_seed(0)
            model, images = timm_stitch.stitch(list(anchors), num_classes=10), torch.randn(2, 3, 224, 224)
        else:
            model, images = tiny.build(), tiny.images()
        exact, ok = check_net(model, images)
        error = '' if model.num_routes > len(model.anchors) else 'no stitched route (tiny configuration)'
        if routes <= len(anchors):
            error = 'no stitched route'
        return Row(name, anchors, routes, exact, ok, macs, error, time.perf_counter() - start)
    except Exception as exc:  # noqa: BLE001 - every outcome is a row
        return _failed(name, anchors, exc, start)


def check_pair(name: str, anchors: tuple[str, str]) -> Row:
    """A cross-family pair: structure and MACs on meta, forward checks at ``CROSS_IMG`` with untrained weights."""
    start = time.perf_counter()
    try:
        routes, macs = meta_structure(list(anchors))
        torch.manual_seed(0)
        model = timm_stitch.stitch(list(anchors), num_classes=10)
        exact, ok = check_net(model, torch.randn(1, 3, CROSS_IMG, CROSS_IMG))
        return Row(name, anchors, routes, exact, ok, macs, '', time.perf_counter() - start)
    except Exception as exc:  # noqa: BLE001 - every outcome is a row
        return _failed(name, anchors, exc, start)


def _child(conn: Any, kind: str, name: str, anchors: tuple[str, str]) -> None:
    warnings.simplefilter('ignore')
    torch.set_num_threads(1)
    try:
        conn.send((check_pair if kind == 'pair' else check_family)(name, anchors))
    except BaseException:  # noqa: BLE001 - a row that cannot be pickled still reports
        conn.send(Row(name, anchors, error='crash: ' + traceback.format_exc(limit=1).splitlines()[-1]))


def run_all(jobs: list[tuple[str, str, tuple[str, str]]], workers: int, timeout: float,
            progress: bool = True) -> list[Row]:
    """Run each ``(kind, name, anchors)`` job in its own process, ``workers`` at a time, each within ``timeout``
    seconds; a job that crashes or runs out of time is a row saying so."""
    ctx = mp.get_context('fork')  # the children share the parent's imports (a spawned one takes ~10 s to import)
    pending, running, rows = list(jobs), {}, {}
    while pending or running:
        while pending and len(running) < workers:
            kind, name, anchors = pending.pop(0)
            parent, child = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_child, args=(child, kind, name, anchors), daemon=True)
            proc.start()
            running[name] = (proc, parent, anchors, time.perf_counter())
        time.sleep(0.05)
        for name, (proc, conn, anchors, began) in list(running.items()):
            elapsed = time.perf_counter() - began
            if conn.poll():
                rows[name] = conn.recv()
            elif not proc.is_alive():
                rows[name] = Row(name, anchors, error=f'crash: process exit code {proc.exitcode}', seconds=elapsed)
            elif elapsed > timeout:
                proc.kill()
                rows[name] = Row(name, anchors, error=f'time-out: over {timeout:.0f} s', seconds=elapsed)
            else:
                continue
            proc.join()
            del running[name]
            if progress:
                row = rows[name]
                done = len(rows)
                print(f'[{done}/{len(jobs)}] {name}: {_verdict(row)} ({row.seconds:.1f} s)', file=sys.stderr,
                      flush=True)
    return [rows[name] for _, name, _ in jobs]


def _verdict(row: Row) -> str:
    if row.stitched:
        return 'stitched'
    return ('refused: ' if row.refused else 'FAILED: ') + (row.error or 'checks failed')


def _yes(flag: Optional[bool]) -> str:
    return '' if flag is None else ('yes' if flag else '**no**')


def _gmacs(macs: Optional[tuple[int, int]]) -> str:
    return '' if macs is None else f'{macs[0] / 1e9:.3g}-{macs[1] / 1e9:.3g}'


def table(rows: list[Row], first: str) -> str:
    """A markdown table of ``rows`` (``first``: the heading of the name column)."""
    lines = [f'| {first} | anchors | routes | anchor routes bit-exact | every route fwd + bwd | GMACs per route '
             '(real size) | refusal / failure |', '|---|---|---|---|---|---|---|']
    for r in rows:
        why = r.error.replace('|', '\\|')
        why = why if len(why) <= 160 else why[:157] + '...'
        lines.append(f'| {r.name} | {" -> ".join(r.anchors)} | {r.routes or ""} | {_yes(r.bit_exact)} | '
                     f'{_yes(r.fwd_bwd)} | {_gmacs(r.macs)} | {why} |')
    return '\n'.join(lines)


def summary(rows: list[Row]) -> str:
    stitched = sum(r.stitched for r in rows)
    refused = sum(r.refused for r in rows)
    return f'{stitched} of {len(rows)} stitched, {refused} refused, {len(rows) - stitched - refused} failed'


def write_docs(text: str, path: Path = DOCS) -> None:
    """Replace what lies between the markers of ``path`` with ``text``."""
    doc = path.read_text()
    if START not in doc or END not in doc:
        raise ValueError(f'{path} lacks the markers {START} ... {END}')
    pattern = re.compile(re.escape(START) + '.*?' + re.escape(END), re.S)
    path.write_text(pattern.sub(lambda _: f'{START}\n{text}\n{END}', doc))


def main(argv: Optional[list[str]] = None) -> tuple[list[Row], list[Row]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--families', nargs='+', help='only these families (timm module names; anchors from '
                                                      'the tiny table, no registry sweep)')
    parser.add_argument('--from-table', action='store_true', help='every family of the tiny table, anchors from '
                                                                   'the table (no registry sweep, which takes minutes)')
    parser.add_argument('--no-cross', action='store_true', help='skip the cross-family pairs')
    parser.add_argument('--workers', type=int, default=2, help='families checked at once (default 2)')
    parser.add_argument('--timeout', type=float, default=300, help='seconds per family or pair (default 300)')
    parser.add_argument('--write-docs', action='store_true', help=f'rewrite the tables in {DOCS.name}')
    parser.add_argument('--quiet', action='store_true', help='no progress lines')
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.from_table:
        args.families = list(TINY)
    if args.families:
        unknown = sorted(set(args.families) - set(TINY))
        if unknown:
            parser.error(f'unknown families {unknown}: known are {sorted(TINY)}')
        families = {f: TINY[f].anchors for f in args.families}
        criterion = (f'{len(families)} families (the tiny table\'s, whose anchors a full sweep checks against '
                     'the registry)') if args.from_table else f'{len(families)} families named by --families'
    else:
        families = zoo_families(args.workers)
        criterion = (f'{len(families)} timm model modules offer at least two pretrained sizes (parameter counts) of '
                     'one model class at one input size (timm.list_models(pretrained=True), meta-device builds)')
        stale = {f: (a, TINY[f].anchors) for f, a in families.items() if f in TINY and TINY[f].anchors != a}
        for f, (registry, tiny) in stale.items():
            print(f'note: {f}: the registry\'s two smallest are {registry}, the tiny table has {tiny}')
    print(criterion)
    enumerated = time.perf_counter() - start
    jobs = [('family', f, a) for f, a in families.items()]
    if not args.no_cross:
        jobs += [('pair', str(i), pair) for i, pair in enumerate(CROSS_PAIRS, 1)]
    rows = run_all(jobs, args.workers, args.timeout, not args.quiet)
    family_rows, cross_rows = rows[:len(families)], rows[len(families):]
    family_text = f'{summary(family_rows)}.\n\n{table(family_rows, "family (timm module)")}'
    print(f'\n== families: {family_text}')
    cross_text = f'{summary(cross_rows)}.\n\n{table(cross_rows, "#")}' if cross_rows else ''
    if cross_rows:
        print(f'\n== cross-family pairs at {CROSS_IMG} px: {cross_text}')
    took = time.perf_counter() - start
    workers = f'{args.workers} worker{"s" if args.workers != 1 else ""}'
    print(f'\nsweep: {took:.0f} s ({enumerated:.0f} s enumerating the registry), {workers}, '
          f'torch {torch.__version__}, timm {__import__("timm").__version__}')
    if args.write_docs:
        write_docs(f'{criterion}: {family_text}\n\nCross-family pairs (forward checks at {CROSS_IMG} px, untrained '
                   f'weights): {cross_text}\n\nSweep: {took:.0f} s with {workers} '
                   f'(`benchmarks/zoo_coverage.py --write-docs`).')
    return family_rows, cross_rows


if __name__ == '__main__':
    main()
