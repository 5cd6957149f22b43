"""The adapter contract: for every family, ``embed -> units -> finish -> head`` is the anchor's own forward, bit for
bit, so that stitched routes run each anchor exactly as timm does; and families register themselves."""
from __future__ import annotations

import pytest
import torch
from conftest import TINY_FAMILIES
from torch import nn

from timm_stitch.adapters import ADAPTERS, AnchorAdapter, adapter_for, register_adapter
from timm_stitch.adapters import base as adapter_base
from timm_stitch.errors import UnsupportedAnchorError


def _run_adapter(adapter: AnchorAdapter, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = adapter.embed(x)
    for unit in adapter.units:
        h = unit(h)
    features = adapter.finish(h, True)
    return features, adapter.head(features)


@torch.no_grad()
def test_embed_units_finish_head_is_the_anchors_forward(family_net):
    model, images, _ = family_net
    model.eval()
    for anchor, adapter in zip(model.anchors, model.adapters):
        features, logits = _run_adapter(adapter, images)
        assert torch.equal(features, anchor.forward_features(images)), type(adapter).__name__
        assert torch.equal(logits, anchor(images)), type(adapter).__name__
        assert torch.equal(adapter.head(features, pre_logits=True), anchor.forward_head(features, pre_logits=True))


def test_every_registered_adapter_has_a_tiny_family():
    """Each registered adapter is exercised by the contract test above (a family in ``conftest.TINY_FAMILIES``)."""
    covered = {type(a) for factory in TINY_FAMILIES.values() for a in factory().model.adapters}
    assert {adapter for _, adapter in ADAPTERS} <= covered


def test_unit_indices_cover_every_unit_once(family_net):
    """``unit_index`` maps each stage's blocks to distinct units, in order; what is left between stages are the
    downsamples (a cut never skips or repeats one)."""
    for adapter in family_net.model.adapters:
        blocks = [adapter.unit_index(s, b) for s, depth in enumerate(adapter.stage_depths()) for b in range(depth)]
        assert blocks == sorted(set(blocks)) and blocks[-1] == len(adapter.units) - 1


class _Toy(nn.Module):
    pass


def test_register_adapter_adds_a_family(monkeypatch):
    monkeypatch.setattr(adapter_base, 'ADAPTERS', list(ADAPTERS))
    with pytest.raises(UnsupportedAnchorError, match=r'cannot stitch a _Toy: it has no forward_features'):
        adapter_for(_Toy())  # the generic adapter's refusal

    @register_adapter(_Toy)
    class ToyAdapter(AnchorAdapter):
        pass

    assert isinstance(adapter_for(_Toy()), ToyAdapter)
    with pytest.raises(ValueError, match='_Toy already has an adapter: ToyAdapter'):
        register_adapter(_Toy)(ToyAdapter)
