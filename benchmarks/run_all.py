"""Run every benchmark once, in sequence, and print the total time (budget: under 15 minutes on 2 CPU cores).

    .venv/bin/python benchmarks/run_all.py            # all of them
    .venv/bin/python benchmarks/run_all.py switch     # just some
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_anchors  # noqa: E402
import bench_compile  # noqa: E402
import bench_export  # noqa: E402
import bench_init_macs  # noqa: E402
import bench_memory  # noqa: E402
import bench_switch  # noqa: E402

BENCHMARKS = {
    'switch': bench_switch.main,
    'export': bench_export.main,
    'anchors': bench_anchors.main,
    'compile': bench_compile.main,
    'memory': bench_memory.main,
    'init_macs': bench_init_macs.main,
}


def main(names: list[str]) -> None:
    unknown = set(names) - set(BENCHMARKS)
    if unknown:
        raise SystemExit(f'unknown benchmark(s) {sorted(unknown)}; choose from {list(BENCHMARKS)}')
    start = time.perf_counter()
    for name in names or BENCHMARKS:
        t = time.perf_counter()
        BENCHMARKS[name]([])
        print(f'[{name}: {time.perf_counter() - t:.0f} s]\n', flush=True)
    print(f'total {time.perf_counter() - start:.0f} s')


if __name__ == '__main__':
    main(sys.argv[1:])
