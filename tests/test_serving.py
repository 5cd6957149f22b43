"""Mixed-route batches: one route id per sample, grouped by route, shared prefixes."""
from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch
from tiny_models import tiny_images, tiny_snnet, tiny_vit_args

from timm_stitch import stitch
from timm_stitch.errors import RouteIdError
from timm_stitch.serving import check_route_ids, group_by_route, mixed_forward

#: families whose shared prefix is bit-exact on CPU; elsewhere (convolutions, LeViT's batched GEMMs) the kernels
#: block by batch size, so the rows of the union batch round differently from those of a group's batch
BIT_EXACT_SHARED = {'deit', 'eva', 'convnext', 'resnet_swin'}


def _ids(num_routes: int, n: int, repeat: int = 1) -> torch.Tensor:
    """Route ids covering anchor routes, stitched routes sharing a front anchor, and repeats (each route ``repeat``
    times at least), in scrambled order."""
    ids = torch.arange(n) // repeat * 7 % num_routes
    return ids[torch.randperm(n, generator=torch.Generator().manual_seed(0))]


def _per_group(model, x, ids):
    """The definition: each route's samples (in input order) run as one batch with that route alone."""
    out = {}
    for k, pos in group_by_route(ids):
        out[k] = (pos, model(x[pos], stitch_id=k))
    return out


def _batch(family_net, n: int) -> torch.Tensor:
    return torch.randn(n, *family_net.images.shape[1:], generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize('share_prefix', [True, False])
def test_mixed_batch_equals_per_route_calls_eval(family, family_net, share_prefix):
    model = family_net.model.eval()
    x = _batch(family_net, 12)
    ids = _ids(family_net.num_routes, 12)
    with torch.no_grad():
        out = mixed_forward(model, x, ids, share_prefix=share_prefix)
        expected = _per_group(model, x, ids)
    for k, (pos, logits) in expected.items():
        if share_prefix and family not in BIT_EXACT_SHARED:
            torch.testing.assert_close(out[pos], logits, rtol=1e-5, atol=1e-5, msg=f'route {k}')
        else:
            assert torch.equal(out[pos], logits), f'route {k}'


def test_mixed_batch_equals_per_route_calls_train(family_net):
    """Train mode: every group runs alone (its own BatchNorm batch statistics, its own dropout draws), in route-id
    order, so the same per-group calls under the same RNG state give the same outputs and running statistics."""
    model = family_net.model.train()
    twin = copy.deepcopy(model)
    x = _batch(family_net, 12)
    ids = _ids(family_net.num_routes, 12, repeat=2)  # BatchNorm needs two samples per channel in train mode
    torch.manual_seed(3)
    out = model(x, stitch_id=ids)
    torch.manual_seed(3)
    expected = _per_group(twin, x, ids)
    for k, (pos, logits) in expected.items():
        assert torch.equal(out[pos], logits), f'route {k}'
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), name


def test_forward_dispatches_sequences_and_tensors():
    model = tiny_snnet()
    x = tiny_images(4)
    with torch.no_grad():
        a = model(x, stitch_id=[3, 0, 3, 5])
        b = model(x, stitch_id=torch.tensor([3, 0, 3, 5], dtype=torch.int32))
        assert torch.equal(a, b)
        assert torch.equal(a[1:2], model(x[1:2], stitch_id=0))


@pytest.mark.parametrize('ids, error, match', [
    ([0, 1, 2], ValueError, r'3 stitch ids for a batch of 4'),
    ([0, 1, 23, -1], RouteIdError, r'stitch_id\[2\] = 23 is out of range: valid ids are 0\.\.22'),
    ([0, -1, 2, 3], RouteIdError, r'stitch_id\[1\] = -1'),
    ([0, 1, 2.0, 3], TypeError, r'stitch_id\[2\] must be an int.*valid ids are 0\.\.22'),
    (torch.zeros(4), TypeError, r'integer dtype, got torch\.float32'),
    (torch.zeros(2, 2, dtype=torch.long), ValueError, r'must be 1-D'),
])
def test_bad_route_ids_name_position_and_range(ids, error, match):
    model = tiny_snnet()
    with pytest.raises(error, match=match):
        model(tiny_images(4), stitch_id=ids)
    with pytest.raises(error, match=match):
        check_route_ids(model, ids, 4)


def test_shared_prefix_runs_common_units_once(monkeypatch):
    """Routes from one front anchor run its embedding once for the union of their samples."""
    model = tiny_snnet()
    routes = [r for r in model.plan.routes if not r.is_anchor and r.anchors[0] == 0]
    ids = [routes[0].id, routes[1].id, routes[0].id, routes[-1].id]
    calls = []
    adapter = model.adapters[0]
    embed = adapter.embed
    monkeypatch.setattr(adapter, 'embed', lambda x: calls.append(len(x)) or embed(x))
    with torch.no_grad():
        mixed_forward(model, tiny_images(4), ids)
    assert calls == [4]
    calls.clear()
    with torch.no_grad():
        mixed_forward(model, tiny_images(4), ids, share_prefix=False)
    assert sorted(calls) == [1, 1, 2]


def test_mixed_batches_are_thread_safe():
    model = tiny_snnet()
    x = tiny_images(6)
    batches = [torch.tensor([k, (k + 5) % 23, k, 0, 22, (k * 3) % 23]) for k in range(12)]
    with torch.no_grad():
        serial = [model(x, stitch_id=ids) for ids in batches]
    results, errors = {}, []

    def worker(i: int) -> None:
        try:
            with torch.no_grad():
                results[i] = model(x, stitch_id=batches[i])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, expected in enumerate(serial):
        assert torch.equal(results[i], expected), f'batch {i} differed under concurrency'


def test_empty_batches_numpy_ids_and_0d_ids():
    model = tiny_snnet().eval()
    x = tiny_images(3)
    with torch.no_grad():
        for ids in ([], torch.tensor([], dtype=torch.long), np.array([], dtype=np.int64)):
            assert model(x[:0], stitch_id=ids).shape == (0, 10)
        ids = np.array([0, 5, 2])
        assert torch.equal(model(x, stitch_id=ids), model(x, stitch_id=ids.tolist()))
        assert torch.equal(model(x, stitch_id=torch.tensor(5)), model(x, stitch_id=5))
        assert torch.equal(model(x, stitch_id=np.int64(5)), model(x, stitch_id=5))


def test_mixed_batch_over_heads_of_different_widths_is_refused():
    """Anchors kept with their own class counts (here 10 and 5) give routes of different output widths: a mixed
    batch over them is a clear ValueError, not a shape error inside the gather."""
    torch.manual_seed(0)
    model = stitch([tiny_vit_args(16, 2, 2, num_classes=10), tiny_vit_args(32, 2, 2, num_classes=5)])
    with pytest.raises(ValueError, match='different shapes'):
        model(tiny_images(2), stitch_id=[0, 1])
