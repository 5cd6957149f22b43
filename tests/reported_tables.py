"""The authors' per-route tables that ship with the package (``timm_stitch/data/reported``), for the tests.

Their source is named in that folder; tests read them from the package, never from outside the repository.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import timm_stitch

REPORTED_DIR = Path(timm_stitch.__file__).resolve().parent / 'data' / 'reported'
#: SN-Net v1 DeiT-Ti/S/B: 71 routes with ``cfg_id``, ``flops``, ``params`` and ``acc1``
DEIT_TSB = REPORTED_DIR / 'snnet_deit_tsb.jsonl'
#: SN-Netv2 DeiT-3 S/L: 134 two-way routes with ``loss``, ``acc1``, ``acc5``, ``cfg_id`` and ``flops``
DEIT3_SL = REPORTED_DIR / 'snnet_deit3_sl.jsonl'
#: the same model's official FLOPs file: ``{"cfg_id": flops}``
DEIT3_SL_FLOPS = REPORTED_DIR / 'snnet_deit3_sl.flops.json'


def read_rows(path: Path = DEIT_TSB) -> list[dict[str, Any]]:
    """The table's rows in file order."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
