"""Per-route BatchNorm statistics under threads, on every BatchNorm family (three anchors, so that one route's
stitched layers are another route's shared prefix).

Each interleaving test is deterministic: thread A stops inside a route whose statistics are swapped in, at a
BatchNorm layer that thread B's call also runs (in a shared prefix, a cascade stage, intermediates, the
least-squares init's anchor pass), and waits for B a moment. B must wait for A (the model's BatchNorm lock) and get
the single-threaded answer; running while A holds its statistics gives another answer.
"""
import threading

import pytest
import torch
from tiny_models import tiny_levit, tiny_resnet, tiny_swin

from timm_stitch import Cascade, StitchedNet
from timm_stitch.bn import stitched_bn_layers
from timm_stitch.ls_init import _unit_outputs
from timm_stitch.models.snnet_levit import LEVIT_STAGES
from timm_stitch.models.snnet_resnet import RESNET_STAGES
from timm_stitch.serving import first_segment_length

#: how long a thread holding swapped statistics waits for the other thread (which, correctly, never comes)
WAIT_S = 0.3


def _resnet() -> tuple[StitchedNet, int]:
    return StitchedNet([tiny_resnet('resnet18'), tiny_resnet('resnet26'), tiny_resnet('resnet50')], num_classes=10,
                       stages=RESNET_STAGES), 32


def _resnet_swin() -> tuple[StitchedNet, int]:
    anchors = [tiny_resnet('resnet18'), tiny_resnet('resnet50'), tiny_swin(16, (2, 2, 6, 2), img_size=64,
                                                                           patch_size=4)]
    return StitchedNet(anchors, num_classes=10, stages=RESNET_STAGES), 64


def _levit() -> tuple[StitchedNet, int]:
    anchors = [tiny_levit((16, 24, 32)), tiny_levit((24, 32, 48)), tiny_levit((32, 48, 64))]
    return StitchedNet(anchors, num_classes=10, stages=LEVIT_STAGES), 64


BN_FAMILIES = {'resnet': _resnet, 'resnet_swin': _resnet_swin, 'levit': _levit}


def _setup(family: str, calibrate: bool = True):
    """The family's eval model (every stitched route calibrated on shifted images), images, a route X into anchor 1,
    the routes Y, Z out of anchor 1 with the longest prefixes, and a layer X swaps that Y and Z share."""
    torch.manual_seed(0)
    model, size = BN_FAMILIES[family]()
    model.eval()
    images = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1))
    routes = model.plan.routes
    into = [r.id for r in routes if r.anchors == (0, 1)]
    out_of = sorted((r.id for r in routes if r.anchors == (1, 2)), key=lambda k: -first_segment_length(model, k))
    x_route, (y, z) = into[0], out_of[:2]
    if calibrate:
        data = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(2)) * 3 + 1
        for r in routes:
            model.recalibrate_bn(data, stitch_id=r.id, num_batches=1, batch_size=8, progress=False)
    prefix = [m for u in model.adapters[1].units[:first_segment_length(model, z)] for m in u.modules()]
    shared = [m for m in stitched_bn_layers(model, x_route) if any(m is p for p in prefix)]
    assert shared, 'the routes picked share no swapped layer'
    return model, images, x_route, (y, z), shared[-1]


def _interleave(model, layer, first, second):
    """Run ``first`` in thread A, stopping at ``layer`` until ``second`` (thread B, started then) is done or
    ``WAIT_S`` passed; B's result."""
    inside, done = threading.Event(), threading.Event()
    a_thread: list[threading.Thread] = []

    def hold(*_):
        if threading.current_thread() is a_thread[0] and not inside.is_set():
            inside.set()
            done.wait(WAIT_S)

    def run_second(out):
        assert inside.wait(30)
        out.append(second())
        done.set()

    handle = layer.register_forward_hook(hold)
    result: list = []
    try:
        a_thread.append(threading.Thread(target=first))
        b = threading.Thread(target=run_second, args=(result,))
        a_thread[0].start()
        b.start()
        a_thread[0].join(60)
        b.join(60)
    finally:
        handle.remove()
    assert result, 'thread B did not finish'
    return result[0]


def _mixed(model, images, routes):
    ids = torch.tensor([routes[i % 2] for i in range(len(images))])
    return model(images, stitch_id=ids)


def _cascade(model, images, routes):
    return Cascade(model, list(routes), threshold=0.9)(images).logits


def _intermediates(model, images, routes):
    final, inter = model.forward_intermediates(images, stitch_id=routes[0])
    return torch.cat([final.flatten(1)] + [t.flatten(1) for t in inter], 1)


def _anchor_pass(model, images, routes):
    return _unit_outputs(model, 1, images)[-1]


ENTRIES = {'mixed_batch': _mixed, 'cascade': _cascade, 'forward_intermediates': _intermediates,
           'ls_init_anchor_pass': _anchor_pass}


@pytest.mark.parametrize('entry', list(ENTRIES))
@pytest.mark.parametrize('bn_family', list(BN_FAMILIES))
@torch.no_grad()
def test_call_waits_for_another_threads_route_statistics(bn_family, entry):
    model, images, x_route, routes, layer = _setup(bn_family)
    run = ENTRIES[entry]
    expected = run(model, images, routes)
    got = _interleave(model, layer, lambda: model(images, stitch_id=x_route), lambda: run(model, images, routes))
    assert torch.equal(got, expected)


@pytest.mark.parametrize('bn_family', list(BN_FAMILIES))
@torch.no_grad()
def test_recalibration_in_one_thread_leaves_another_threads_calls_alone(bn_family):
    """recalibrate_bn runs the route's layers in train mode with fresh buffers: other eval calls wait for it."""
    model, images, x_route, _, layer = _setup(bn_family, calibrate=False)
    anchor_route = 1  # runs every layer of anchor 1, which route X recalibrates
    expected = model(images, stitch_id=anchor_route)
    data = torch.randn(8, *images.shape[1:], generator=torch.Generator().manual_seed(2)) * 3 + 1
    got = _interleave(model, layer,
                      lambda: model.recalibrate_bn(data, stitch_id=x_route, num_batches=1, progress=False),
                      lambda: model(images, stitch_id=anchor_route))
    assert torch.equal(got, expected)


@pytest.mark.parametrize('bn_family', list(BN_FAMILIES))
@torch.no_grad()
def test_many_threads_of_mixed_batches_and_single_routes_match_one_thread(bn_family):
    model, images, x_route, routes, _ = _setup(bn_family)
    calls = [lambda: model(images, stitch_id=x_route), lambda: _mixed(model, images, routes),
             lambda: model(images, stitch_id=routes[1])]
    expected = [call() for call in calls]
    wrong: list[int] = []

    def worker(k):
        for i in range(6):
            j = (k + i) % len(calls)
            if not torch.equal(calls[j](), expected[j]):
                wrong.append(j)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not wrong
