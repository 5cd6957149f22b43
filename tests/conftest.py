"""Shared pytest fixtures, and the registry of tiny stitched networks per family.

A test taking a ``family`` argument runs once per family of :data:`TINY_FAMILIES` (or those named by its
``@pytest.mark.families(...)`` marker); its ``family_net`` fixture is that family's tiny network. The families of
timm's whole zoo, one tiny configuration each, are ``tests/zoo_families.py``'s ``TINY`` (shared with
``benchmarks/zoo_coverage.py``); ``tests/test_zoo.py`` runs each through the contract in one combined test.
"""
from __future__ import annotations

import os
from typing import Callable

import huggingface_hub.constants as hf_constants
import pytest
import tiny_models
import torch
from hub_server import HubServer

#: family name -> factory of a tiny stitched network of that family (anchors defined in ``tests/tiny_models.py``)
TINY_FAMILIES: dict[str, Callable[[], tiny_models.TinyFamily]] = {
    'deit': tiny_models.deit_family,
    'eva': tiny_models.eva_family,
    'swin': tiny_models.swin_family,
    'resnet': tiny_models.resnet_family,
    'resnet_swin': tiny_models.resnet_swin_family,
    'convnext': tiny_models.convnext_family,
    'levit': tiny_models.levit_family,
    'resnetv2': tiny_models.resnetv2_family,
    'vit_grids': tiny_models.vit_grids_family,
    'resnet_vit': tiny_models.resnet_vit_family,
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line('markers', 'families(*names): the tiny families a test taking `family` runs on '
                                       '(default: all of conftest.TINY_FAMILIES)')


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if 'family' not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker('families')
    names = marker.args if marker else tuple(TINY_FAMILIES)
    unknown = set(names) - set(TINY_FAMILIES)
    if unknown:
        raise ValueError(f'unknown tiny families {sorted(unknown)}: known are {sorted(TINY_FAMILIES)}')
    metafunc.parametrize('family', names)


@pytest.fixture
def family_net(family: str) -> tiny_models.TinyFamily:
    """The tiny stitched network of ``family`` (fresh per test), its input batch and its number of routes."""
    return TINY_FAMILIES[family]()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fresh in-memory Hub (``tests/hub_server.py``) that the real ``huggingface_hub`` client talks to through
    ``HF_ENDPOINT``, with an empty cache in ``tmp_path``, online. ``hub.offline()`` switches to ``HF_HUB_OFFLINE=1``."""
    cache = tmp_path / 'hf-cache'
    with HubServer() as server:
        # huggingface_hub reads these at import: set the module constants as well as the environment
        settings = {
            'ENDPOINT': server.endpoint,
            'HUGGINGFACE_CO_URL_TEMPLATE': server.endpoint + '/{repo_id}/resolve/{revision}/{filename}',
            'HF_HUB_CACHE': str(cache),
            'HF_HUB_OFFLINE': False,
            'HF_TOKEN_PATH': str(tmp_path / 'hf-token'),
            'AGENT_HARNESSES_PATH': str(tmp_path / 'agent-harnesses.json'),
        }
        for key, value in settings.items():
            monkeypatch.setattr(hf_constants, key, value)
        monkeypatch.setenv('HF_ENDPOINT', server.endpoint)
        monkeypatch.setenv('HF_HUB_CACHE', str(cache))
        monkeypatch.setenv('HF_TOKEN', 'hf_local_test_token')
        monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)

        def offline(enabled: bool = True) -> None:
            monkeypatch.setattr(hf_constants, 'HF_HUB_OFFLINE', enabled)
            monkeypatch.setenv('HF_HUB_OFFLINE', '1' if enabled else '0')

        server.cache_dir = cache
        server.offline = offline
        yield server


#: torch's own thread count, shared among pytest-xdist's workers (``scripts/test.sh`` runs two), which the full-size
#: ``slow`` tests use
DEFAULT_THREADS = max(1, torch.get_num_threads() // int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1')))
# Tiny models run fastest on one thread (several threads on a busy 2-core CPU are 10-40x slower). Set for the whole
# session, so that module-scoped fixtures compute on the same thread count as the tests that compare with them
# (reductions split over other thread counts round differently).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def default_threads_for_slow_tests(request):
    """The full-size ``slow`` tests run on torch's default thread count; every other test on one thread."""
    if not request.node.get_closest_marker('slow'):
        yield
        return
    torch.set_num_threads(DEFAULT_THREADS)
    yield
    torch.set_num_threads(1)
