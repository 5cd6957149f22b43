"""The Ray Serve deployment end to end on 127.0.0.1: HTTP and handle answers against the model run directly on the
route that answered, 400s naming the bad field, and replicas killed mid-trace (one Ray start for the module)."""
from __future__ import annotations

import base64
import io
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import timm
import torch
from PIL import Image

from timm_stitch.data import load_fashion_mnist_sample

pytestmark = pytest.mark.integration
ray_serve = pytest.importorskip('timm_stitch.ray_serve', reason='needs the [serve] extra (ray[serve])')

MODEL = 'snnet_vit_fmnist_tsb'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def app():
    """Ray on 127.0.0.1 with two replicas of the shipped model (each profiling its own latency at start)."""
    port = _free_port()
    ray_serve.start_local_ray(num_cpus=2, http_port=port)
    import ray
    from ray import serve
    serve.run(ray_serve.build_app(MODEL, num_replicas=2, batch_sizes=(1, 4), slo_ms=5000.0, profile_repeats=2),
              name='timm-stitch', route_prefix='/')
    model = timm.create_model(MODEL, pretrained=True).eval()
    yield f'http://127.0.0.1:{port}/', model
    serve.shutdown()
    ray.shutdown()
    for key in ray_serve.LOOPBACK_ENV:
        os.environ.pop(key, None)


def _post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {'Content-Type': 'application/json'})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            return e.code, json.loads(body)
        except ValueError:
            return e.code, {'error': body.decode(errors='replace')}


def _direct(model, x: torch.Tensor, route: int) -> torch.Tensor:
    with torch.inference_mode():
        return model(x[None], stitch_id=route)[0]


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def test_http_answers_are_the_model_on_the_route_that_answered(app):
    url, model = app
    images = _images(16)
    extras = [{}, {'route': 3}, {'min_top1': 88.5}, {'deadline_ms': 2000}, {'max_macs': 2e7}, {'route': 0}]
    payloads = [{'tensor': x.tolist(), **extras[i % len(extras)]} for i, x in enumerate(images)]
    with ThreadPoolExecutor(8) as pool:  # concurrent, so that replicas batch several routes together
        answers = list(pool.map(lambda p: _post(url, p), payloads))
    routes = model.routes()
    for i, ((status, body), x) in enumerate(zip(answers, images)):
        assert status == 200, body
        torch.testing.assert_close(torch.tensor(body['logits']), _direct(model, x, body['route']), rtol=1e-4,
                                   atol=1e-4)
        extra = extras[i % len(extras)]
        assert body['route'] == extra.get('route', body['route'])
        assert routes[body['route']].top1 >= extra.get('min_top1', 0)
        assert routes[body['route']].macs <= extra.get('max_macs', float('inf'))
    # an encoded image file goes through the model's own preprocessing
    pixels = load_fashion_mnist_sample()[0][0]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format='PNG')
    status, body = _post(url, {'image': base64.b64encode(buffer.getvalue()).decode(), 'route': 2})
    assert status == 200 and body['route'] == 2
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    expected = _direct(model, transform(Image.fromarray(pixels).convert('L')), 2)
    torch.testing.assert_close(torch.tensor(body['logits']), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('payload, field', [
    ({}, 'image'),
    ({'tensor': [[1.0, 2.0]]}, 'tensor'),
    ({'tensor': 'abc'}, 'tensor'),
    ({'image': 'not base64!'}, 'image'),
    ({'deadline_ms': -5}, 'deadline_ms'),
    ({'route': 999}, 'route'),
    ({'route': 'big'}, 'route'),
    ({'min_top1': 101.0}, 'min_top1'),
    ({'colour': 'red'}, 'colour'),
])
def test_a_bad_request_gets_a_400_naming_the_field(app, payload, field):
    url, _ = app
    if 'tensor' not in payload and 'image' not in payload and field != 'image':
        payload = {'tensor': _images(1)[0].tolist(), **payload}
    status, body = _post(url, payload)
    assert status == 400 and body['field'] == field and body['error'].startswith(f'{field}: '), body


def test_the_python_handle_answers_and_refuses_like_http(app):
    from ray import serve
    _, model = app
    handle = serve.get_app_handle('timm-stitch')
    x = _images(1, seed=3)[0]
    body = handle.infer.remote(tensor=x, route=5).result()
    assert body['route'] == 5
    torch.testing.assert_close(torch.tensor(body['logits']), _direct(model, x, 5), rtol=1e-4, atol=1e-4)
    with pytest.raises(Exception, match='deadline_ms: expected a positive number'):
        handle.infer.remote(tensor=x, deadline_ms=0).result()


def test_replicas_killed_mid_trace_lose_no_retried_request(app):
    import ray
    url, model = app
    images, clients = _images(48, seed=7), 8
    retried, lock, answered, sent = [], threading.Lock(), {}, set()
    first_answer, killed = threading.Event(), threading.Event()

    def client(start: int) -> None:
        # walks its share of the trace, and keeps the load on until the replicas are dead, so that requests are in
        # flight when they die however fast the machine answers; failures (the killed replicas' requests) are retried
        request = start
        while (request < len(images) or not killed.is_set()) and request < 100 * len(images):
            with lock:
                sent.add(request)
            for _ in range(120):
                try:
                    status, body = _post(url, {'tensor': images[request % len(images)].tolist()})
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    status, body = None, {}
                if status == 200:
                    with lock:
                        answered[request] = body
                    first_answer.set()
                    break
                with lock:
                    retried.append(request)
                time.sleep(0.5)
            else:
                return
            request += clients

    def kill_replicas() -> None:  # every replica, so that requests in flight are lost whichever one they reached
        if not first_answer.wait(timeout=300):
            return
        for actor in ray.util.list_named_actors(all_namespaces=True):
            if 'SERVE_REPLICA' in actor['name']:
                ray.kill(ray.get_actor(actor['name'], namespace=actor['namespace']), no_restart=True)
        killed.set()

    killer = threading.Thread(target=kill_replicas)
    killer.start()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    killer.join()
    print(f'replicas killed mid-trace: {len(sent)} requests, {len(retried)} retries '
          f'({len(set(retried))} requests retried), {len(answered)} answered')
    assert killed.is_set() and retried and sorted(answered) == sorted(sent)
    for request, body in answered.items():
        torch.testing.assert_close(torch.tensor(body['logits']),
                                   _direct(model, images[request % len(images)], body['route']), rtol=1e-4, atol=1e-4)
