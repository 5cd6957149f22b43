"""The timm zoo: each stitchable family's tiny configuration through the stitching contract (one combined test per
family, quick), the whole registry ending in a network or a clear refusal, and the zoo benchmark (slow)."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
from zoo_families import CROSS_PAIRS, TINY, check_net, zoo_families

import timm_stitch
from timm_stitch.features import route_feature_info

#: stitched families whose tiny test runs in the quick suite (widths shrunk: a few hundred ms each); the other
#: stitched families' tiny tests are ``slow``, and the whole zoo is the benchmark's sweep
QUICK = frozenset({'beit', 'convnext', 'deit', 'fasternet', 'hiera', 'mambaout', 'pvt_v2', 'resnetv2', 'starnet',
                   'swiftformer', 'swin_transformer'})
#: families the sweep (docs/zoo.md) records as refused or failing, whose tiny test is not run; each a lead for an
#: adapter
NOT_STITCHED = frozenset({
    'coat', 'crossvit', 'deepseek_vit', 'efficientvim', 'gemma4_vit', 'hrnet', 'mvitv2', 'pit', 'qwen3_vit', 'selecsls',
    'tnt', 'tresnet', 'twins', 'vision_transformer_relpos', 'vision_transformer_sam', 'xception_aligned',
})
FAMILIES = [pytest.param(f, marks=() if f in QUICK else pytest.mark.slow) for f in sorted(set(TINY) - NOT_STITCHED)]


def _check_contract(model: timm_stitch.StitchedNet, x: torch.Tensor) -> None:
    """Adapter contract, intermediates, export parity and a mixed-route batch equal to route-by-route outputs."""
    model.eval()
    stitched = [r.id for r in model.plan.routes if not r.is_anchor]
    assert stitched, 'no stitched route'
    probe = stitched[len(stitched) // 2]
    with torch.no_grad():
        for anchor, adapter in zip(model.anchors, model.adapters):
            h = adapter.embed(x)
            for unit in adapter.units:
                h = unit(h)
            features = adapter.finish(h, True)
            assert torch.equal(features, anchor.forward_features(x)), type(adapter).__name__
            assert torch.equal(adapter.head(features), anchor(x)), type(adapter).__name__
        for route in (0, probe):
            final, inters = model.forward_intermediates(x, stitch_id=route)
            assert len(inters) == len(route_feature_info(model, route))
            assert torch.equal(final, model.forward_features(x, stitch_id=route))
        ids = [0, probe, len(model.plan.routes) - 1]
        single = [model(x[i:i + 1], stitch_id=k) for i, k in enumerate(ids)]
        torch.testing.assert_close(model(x[:3], stitch_id=ids), torch.cat(single), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(timm_stitch.export_stitch(model, probe)(x), model(x, stitch_id=probe),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings('ignore:route')
@pytest.mark.parametrize('zoo_family', FAMILIES)
def test_family_stitches(zoo_family):
    """One combined test per family: anchor routes bit-exact with timm, every route forward and backward, the
    adapter contract, intermediates, export parity and mixed-route batches, on the family's tiny anchors."""
    tiny = TINY[zoo_family]
    model = tiny.build()
    x = tiny.images(3)
    assert check_net(model, x[:2]) == (True, True)
    _check_contract(model, x)


@pytest.mark.parametrize('anchors', [('vitamin_small_224', 'vitamin_base_224'),
                                     ('vit_tiny_r_s16_p8_224', 'vit_small_r26_s32_224')])
def test_crash_faults_are_results_or_refusals(anchors):
    """Two faults of issue 23: a MbConv-stem ViT (vitamin's patch embedding has no projection conv) crashed with an
    AttributeError, and hybrid ViTs reported their backbone's width (64, 2048) as the input channels."""
    try:  # two blocks each: the faults are in the patch embedding
        model = timm_stitch.stitch([dict(model_name=a, depth=2) for a in anchors], device='meta')
    except (TypeError, ValueError) as exc:
        assert 'input channels' not in str(exc), exc
    else:
        assert all(a.in_chans == 3 for a in model.adapters)


def _meta_outcome(anchors: tuple[str, str]) -> str:
    try:
        timm_stitch.stitch(list(anchors), device='meta')
    except (TypeError, ValueError) as exc:
        return f'refused: {type(exc).__name__}'
    return 'stitched'


@pytest.mark.slow
def test_every_anchor_pair_is_a_result_or_a_refusal():
    """Over the whole registry (the two smallest of each family) and the cross-family pairs: ``stitch`` returns a
    network or raises a ``TypeError`` / ``ValueError``, never another exception."""
    pairs = list(zoo_families(2).values()) + list(CROSS_PAIRS)
    assert len(pairs) >= 90 + 12
    crashed = {}
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        for anchors in pairs:
            try:
                _meta_outcome(anchors)
            except Exception as exc:  # noqa: BLE001 - what the test reports
                crashed[anchors] = f'{type(exc).__name__}: {exc}'
    assert not crashed, crashed


@pytest.mark.slow
def test_zoo_benchmark_sweep_and_its_docs_table():
    """The whole-zoo sweep (``benchmarks/zoo_coverage.py``): every family and pair stitched or refused (no crash,
    no time-out, no failed check), at least 72 families stitched, and docs/zoo.md holds this run's tables."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
    import zoo_coverage
    families, cross = zoo_coverage.main(['--from-table', '--workers', '2', '--quiet'])  # registry: the test above
    failed = [(r.name, r.error) for r in families + cross if not (r.stitched or r.refused)]
    assert not failed, failed
    assert sum(r.stitched for r in families) >= 72 and len(cross) >= 12
    docs = zoo_coverage.DOCS.read_text()
    for row in zoo_coverage.table(families, 'family (timm module)').splitlines()[2:]:
        assert row in docs, f'docs/zoo.md is stale (rerun benchmarks/zoo_coverage.py --write-docs): {row}'
