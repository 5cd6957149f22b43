"""One compiled graph per route: no recompile-limit fallback however many routes.

Importing ``timm.optim`` (its Kron optimizer) raises dynamo's recompile limit to 1,000,000 for the whole process, so
these tests pin torch's default of 8.
"""
import pytest
import torch
import torch._dynamo.testing
from tiny_models import tiny_images, tiny_snnet

import timm_stitch

DEFAULT_LIMIT = torch._dynamo.config.patch(recompile_limit=8)
pytestmark = pytest.mark.integration


@DEFAULT_LIMIT
def test_every_route_compiles_once_and_matches_eager():
    torch._dynamo.reset()
    model, images = tiny_snnet(), tiny_images(2)
    assert model.num_routes > torch._dynamo.config.recompile_limit
    counter = torch._dynamo.testing.CompileCounter()
    compiled = timm_stitch.compile(model, backend=counter)
    with torch.no_grad():
        for _ in range(2):  # the second pass must hit every cache
            for stitch_id in range(model.num_routes):
                torch.testing.assert_close(compiled(images, stitch_id=stitch_id), model(images, stitch_id=stitch_id))
        model.set_stitch(5)
        torch.testing.assert_close(compiled(images), model(images, stitch_id=5))
    assert counter.frame_count == model.num_routes
    assert compiled.compiled_routes == list(range(model.num_routes))


@DEFAULT_LIMIT
def test_naive_compile_hits_the_recompile_limit():
    """Why the wrapper exists: compiling the model and switching routes stops compiling after the limit."""
    torch._dynamo.reset()
    model, images = tiny_snnet(), tiny_images(2)
    counter = torch._dynamo.testing.CompileCounter()
    naive = torch.compile(model, backend=counter)
    with torch.no_grad():
        for stitch_id in range(model.num_routes):
            model.set_stitch(stitch_id)
            naive(images)
    assert counter.frame_count <= torch._dynamo.config.recompile_limit < model.num_routes


def test_bad_route_id_raises_before_compiling():
    compiled = timm_stitch.compile(tiny_snnet(), backend='eager')
    try:
        compiled(tiny_images(1), stitch_id=99)
    except ValueError as e:
        assert 'stitch_id 99 is out of range' in str(e)
    else:
        raise AssertionError('expected ValueError')
    assert compiled.compiled_routes == []


def _id_sets(count: int, routes: list[int], seed: int = 0) -> list[torch.Tensor]:
    """``count`` different per-sample id sets: 3 of ``routes``, two samples each, shuffled."""
    g = torch.Generator().manual_seed(seed)
    sets: list[torch.Tensor] = []
    while len(sets) < count:
        chosen = torch.tensor(routes)[torch.randperm(len(routes), generator=g)[:3]]
        ids = chosen.repeat(2)[torch.randperm(6, generator=g)]
        if not any(torch.equal(ids, s) for s in sets):
            sets.append(ids)
    return sets


@DEFAULT_LIMIT
def test_mixed_batches_run_each_routes_compiled_graph_without_recompiling():
    torch._dynamo.reset()
    model, images = tiny_snnet(), tiny_images(6)
    routes = [0, 5, 9, 13]
    counter = torch._dynamo.testing.CompileCounter()
    compiled = timm_stitch.compile(model, backend=counter)
    sets = _id_sets(12, routes)
    assert len(sets) > torch._dynamo.config.recompile_limit
    with torch.no_grad():
        for i, ids in enumerate(sets):
            given = ids.tolist() if i % 2 else ids  # a list or a tensor
            torch.testing.assert_close(compiled(images, stitch_id=given), model(images, stitch_id=ids))
    assert counter.frame_count == len(routes)  # one graph per route, whatever the set of ids
    assert compiled.compiled_routes == routes


@DEFAULT_LIMIT
def test_torch_compile_of_the_model_takes_mixed_batches_without_recompiling():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model, images = tiny_snnet(), tiny_images(6)
    compiled = torch.compile(model, backend=torch._dynamo.testing.CompileCounter())
    with torch.no_grad():
        for i, ids in enumerate(_id_sets(12, [0, 5, 9, 13])):
            torch.testing.assert_close(compiled(images, stitch_id=ids), model(images, stitch_id=ids))
            if i == 0:
                frames = dict(torch._dynamo.utils.counters['frames'])
    assert dict(torch._dynamo.utils.counters['frames']) == frames  # nothing compiled after the first set
    assert not torch._dynamo.utils.counters['recompiles']
