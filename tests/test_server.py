"""The in-process server core: queued requests answered in mixed-route batches on the controller's routes."""
from __future__ import annotations

import base64
import gc
import io
import weakref

import pytest
import torch
from PIL import Image
from tiny_models import tiny_images, tiny_snnet

from timm_stitch.server import BadRequestError, BatchRecord, StitchServer, parse_request
from timm_stitch.slo import Arrivals, Bounds, NoRouteFitsError, RouteController, RouteCost, RouteTable


@pytest.fixture(scope='module')
def model():
    return tiny_snnet().eval()


def _controller(model, slow=None):
    """Route ``i`` takes ``1 + i`` ms (``slow``: that route 1000x slower), top-1 rising with the id."""
    costs = []
    for i in range(model.num_routes):
        ms = (1.0 + i) * (1000 if i == slow else 1)
        costs.append(RouteCost(i, 50.0 + i, 1, {1: ms, 4: 2 * ms}))
    return RouteController(RouteTable(costs))


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_each_answer_is_the_model_on_the_route_that_answered(model):
    clock = FakeClock()
    server = StitchServer(model, _controller(model), slo_ms=None, clock=clock)
    images = tiny_images(6)
    pins = [None, 0, 3, None, Bounds(min_top1=52.0), Bounds(max_macs=model.counted_routes()[1].macs)]
    futures = [server.submit(x, bounds=p if isinstance(p, Bounds) else Bounds(route=p)) for x, p in zip(images, pins)]
    assert server.metrics()['queue_length'] == 6
    while server.step():
        pass
    results = [f.result(timeout=0) for f in futures]
    best = model.num_routes - 1
    assert [r.route for r in results[:4]] == [best, 0, 3, best]
    assert results[4].route >= 2
    with torch.inference_mode():
        for x, r in zip(images, results):
            torch.testing.assert_close(r.logits, model(x[None], stitch_id=r.route)[0], rtol=1e-4, atol=1e-5)
    metrics = server.metrics()
    assert metrics['served'] == 6 and metrics['batches'] == 2 and metrics['max_queue_length'] == 6
    assert sum(metrics['routes'].values()) == 6 and metrics['slo_attainment'] is None


def test_deadlines_pick_faster_routes_and_are_counted(model):
    clock = FakeClock()
    slow = model.num_routes - 1
    server = StitchServer(model, _controller(model, slow=slow), slo_ms=50.0, clock=clock)
    future = server.submit(tiny_images(1)[0])
    server.step()
    result = future.result(timeout=0)
    assert result.route == slow - 1 and result.deadline_ms == 50.0 and result.met_deadline
    late = server.submit(tiny_images(1)[0], deadline_ms=10.0)
    clock.t = 1.0  # it waited a second in the queue
    server.step()
    assert not late.result(timeout=0).met_deadline
    assert server.metrics()['slo_attainment'] == 0.5


def test_each_batch_is_recorded_with_its_plan_and_timings(model):
    clock, records = FakeClock(), []
    controller = _controller(model)
    server = StitchServer(model, controller, slo_ms=100.0, clock=clock, on_batch=records.append)
    futures = [server.submit(x) for x in tiny_images(6)]
    while server.step():
        clock.t += 0.001
    assert [r.queue_length for r in records] == [6, 2] and all(isinstance(r, BatchRecord) for r in records)
    assert [len(r.plan.take) for r in records] == [4, 2] and records[0].plan_ms == 0.0 and records[1].planned == 0.001
    routes = [f.result(timeout=0).route for f in futures]
    assert sorted(routes) == sorted(r for rec in records for r in rec.plan.routes)
    assert all(r.scale == controller.scale and r.plan.feasible == (True,) * len(r.plan.take) for r in records)


class RecordingController(RouteController):
    def __init__(self, table):
        super().__init__(table)
        self.arrivals = []

    def plan(self, queue, now, arrivals=None):
        self.arrivals.append(arrivals)
        return super().plan(queue, now, arrivals)


def test_the_controller_plans_for_the_recent_arrival_rate(model):
    clock = FakeClock()
    controller = RecordingController(_controller(model).table)
    server = StitchServer(model, controller, slo_ms=200.0, clock=clock, rate_window_s=0.5)
    for k in range(5):  # five requests over the last 0.4 s: 10 per second, under the server's 200 ms deadline
        clock.t = 0.1 * k
        server.submit(tiny_images(1)[0])
    server.step()
    clock.t = 0.75  # the first three left the window
    server.step()
    clock.t = 2.0
    server.submit(tiny_images(1)[0], deadline_ms=50.0)
    server.step()
    assert controller.arrivals == [Arrivals(10.0, 0.2), Arrivals(4.0, 0.2), Arrivals(2.0, 0.2)]
    without = RecordingController(controller.table)
    for kwargs in (dict(slo_ms=None), dict(slo_ms=200.0, rate_window_s=0.0)):  # no default deadline; no window
        server = StitchServer(model, without, clock=clock, **kwargs)
        server.submit(tiny_images(1)[0], deadline_ms=50.0)
        server.step()
    assert without.arrivals == [None, None]
    for bad in (-1, float('nan'), float('inf'), '1'):
        with pytest.raises(ValueError, match=f'rate_window_s must be a finite number >= 0, got {bad!r}'):
            StitchServer(model, controller, rate_window_s=bad)


def test_stop_can_cancel_the_backlog(model):
    server = StitchServer(model, _controller(model), clock=FakeClock())
    futures = [server.submit(x) for x in tiny_images(6)]
    server.step()
    server.stop(cancel=True)
    assert [f.cancelled() for f in futures] == [False] * 4 + [True] * 2 and server.metrics()['queue_length'] == 0
    with pytest.raises(RuntimeError, match='the server is stopped'):
        server.submit(tiny_images(1)[0])


def test_the_worker_thread_answers_every_request(model):
    with StitchServer(model, _controller(model), slo_ms=1e4) as server:
        futures = [server.submit(x) for x in tiny_images(12)]
        results = [f.result(timeout=60) for f in futures]
    assert len(results) == 12 and server.metrics()['served'] == 12 and server.metrics()['queue_length'] == 0


@pytest.mark.parametrize('freeze', [True, False])
def test_the_objects_alive_at_start_leave_the_full_collections(model, freeze):
    # a full collection over torch's and the model's objects holds every thread for about 250 ms: a stall
    assert gc.get_freeze_count() == 0
    with StitchServer(model, _controller(model), slo_ms=1e4, freeze_gc=freeze) as server:
        assert (gc.get_freeze_count() > 10_000) is freeze
        assert server.submit(tiny_images(1)[0]).result(timeout=60).route in range(model.num_routes)
        with StitchServer(model, _controller(model), slo_ms=1e4, freeze_gc=freeze):
            pass
        assert (gc.get_freeze_count() > 10_000) is freeze  # the first server still runs
    assert gc.get_freeze_count() == 0  # given back when the last server that froze stops


def test_a_cycle_made_before_start_is_collected_once_the_server_stops(model):
    class Node:
        pass

    a, b = Node(), Node()
    a.other, b.other = b, a
    watch = weakref.ref(a)
    with StitchServer(model, _controller(model), slo_ms=1e4):
        del a, b
        gc.collect()
        assert watch() is not None  # frozen while serving
    gc.collect()
    assert watch() is None


@pytest.mark.parametrize('kwargs, error, match', [
    (dict(x=torch.zeros(3, 8, 8)), ValueError, r'x has shape \(3, 8, 8\), the model takes images of shape'),
    (dict(x=torch.zeros(1, 3, 32, 32)), ValueError, r'x must be one image tensor \(C, H, W\)'),
    (dict(deadline_ms=-1), ValueError, 'deadline_ms must be a number > 0, got -1'),
    (dict(bounds=Bounds(route=99)), NoRouteFitsError, 'route 99 is not served'),
])
def test_bad_requests_are_refused_before_queueing(model, kwargs, error, match):
    server = StitchServer(model, _controller(model))
    kwargs.setdefault('x', tiny_images(1)[0])
    with pytest.raises(error, match=match):
        server.submit(**kwargs)
    assert server.metrics()['queue_length'] == 0


@pytest.mark.parametrize('payload, field', [
    ([1, 2], 'body'), ({}, 'image'), ({'tensor': [[1.0]]}, 'tensor'), ({'tensor': 'x'}, 'tensor'),
    ({'image': b'not an image'}, 'image'), ({'deadline_ms': 0}, 'deadline_ms'), ({'route': 1.5}, 'route'),
    ({'max_macs': float('inf')}, 'max_macs'), ({'speed': 'max'}, 'speed'),
])
def test_parse_request_names_the_bad_field(payload, field):
    if isinstance(payload, dict) and field not in ('image', 'tensor'):
        payload = {'tensor': torch.zeros(3, 4, 4).tolist(), **payload}
    with pytest.raises(BadRequestError, match=f'^{field}: ') as info:
        parse_request(payload, (3, 4, 4), transform=lambda data: Image.open(io.BytesIO(data)))
    assert info.value.field == field


def test_parse_request_reads_tensors_images_and_bounds():
    x, deadline, bounds = parse_request({'tensor': torch.ones(3, 4, 4).tolist(), 'deadline_ms': 20, 'route': 2,
                                         'min_top1': 70}, (3, 4, 4))
    assert torch.equal(x, torch.ones(3, 4, 4)) and deadline == 20 and bounds == Bounds(route=2, min_top1=70)
    data = base64.b64encode(b'raw').decode()
    x, deadline, bounds = parse_request({'image': data}, (3, 4, 4), transform=lambda b: torch.full((3, 4, 4), len(b)))
    assert x[0, 0, 0] == 3 and deadline is None and bounds == Bounds()


def test_serve_command_refuses_a_port_out_of_range_before_starting_ray(capsys):
    from timm_stitch.cli import main
    with pytest.raises(SystemExit) as exited:
        main(['serve', 'snnet_vit_fmnist_tsb', '--port', '99999'])
    assert exited.value.code == 2 and "expected an integer in [1, 65535], got '99999'" in capsys.readouterr().err


def test_the_deployment_plans_deadlines_a_quarter_of_the_slo_early_by_default():
    """The Ray replica's controller has the reserve the benchmark measured (a quarter of the SLO) unless told."""
    import timm

    from timm_stitch.ray_serve import StitchDeployment
    shipped = timm.create_model('snnet_vit_fmnist_tsb', pretrained=True)
    for kwargs, reserve in ((dict(slo_ms=80.0), 20.0), (dict(slo_ms=80.0, reserve_ms=5.0), 5.0)):
        deployment = StitchDeployment(shipped, batch_sizes=(1,), profile_repeats=1, **kwargs)
        try:
            assert deployment.server.controller.reserve_ms == reserve
        finally:
            deployment.server.stop()
