"""Run a stock timm script with the stitched architectures registered: ``python -m timm_stitch.run_script
[--stitch-id K] SCRIPT [ARGS...]``.

timm's ``validate.py``, ``benchmark.py``, ``inference.py`` and ``onnx_export.py`` (in a timm checkout, not in the
wheel) have no ``--device-modules`` option to import a plugin. This imports ``timm_stitch`` (registering every
``snnet_*`` architecture), then runs SCRIPT as ``__main__`` with ``sys.argv`` set to ``[SCRIPT, *ARGS]``, its folder
first on ``sys.path`` as ``python SCRIPT`` would, and exits with the script's exit status. A route is picked
through the scripts' own ``--model-kwargs stitch_id=K``, or, for a script without ``--model-kwargs`` (such as
``onnx_export.py``), with ``--stitch-id K`` before SCRIPT: every stitched network the script builds without a
``stitch_id`` then runs route K.
"""
from __future__ import annotations

import os
import runpy
import sys
from typing import Optional, Sequence

__all__ = ['main']

_USAGE = 'usage: python -m timm_stitch.run_script [--stitch-id K] SCRIPT [ARGS...]'


def _error(message: str) -> int:
    print(f'{_USAGE}\ntimm_stitch.run_script: error: {message}', file=sys.stderr)
    return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``argv[0]`` (a Python script) with ``argv[1:]`` as its arguments; returns its exit status (2 when the
    script does not exist, as argparse does for bad arguments)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ('-h', '--help'):
        details = __doc__.split('\n\n', 1)[1].replace('``', '').rstrip()
        print(f'{_USAGE}\n\n{details}', file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    stitch_id = None
    if argv[0] == '--stitch-id' or argv[0].startswith('--stitch-id='):
        value, argv = (argv[1:2], argv[2:]) if argv[0] == '--stitch-id' else ([argv[0].split('=', 1)[1]], argv[1:])
        if not value or not value[0].isdigit():
            return _error(f'--stitch-id expects a route id (an integer >= 0), got {value[0] if value else None!r}')
        stitch_id = int(value[0])
        if not argv:
            return _error('no SCRIPT after --stitch-id')
    script = argv[0]
    if not os.path.isfile(script):
        return _error(f'script {script!r} does not exist (expected the path of a Python script, e.g. validate.py in '
                      'a timm checkout)')
    import timm_stitch  # noqa: F401  (registers the snnet_* architectures with timm)
    from timm_stitch.models._factory import default_stitch_id
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [script, *argv[1:]]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        with default_stitch_id(stitch_id):
            runpy.run_path(script, run_name='__main__')
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or 0
        print(exit_.code, file=sys.stderr)  # sys.exit('message'), as the interpreter reports it
        return 1
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
