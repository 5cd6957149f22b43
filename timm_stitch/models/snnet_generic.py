"""``timm.create_model('snnet', anchors=[...])``: a stitched network over any compatible timm anchors.

The same as :func:`timm_stitch.stitch` (anchors sorted by size, positions picked, incompatible families refused
with an error naming what differs), built through timm's factory so that ``pretrained_cfg`` and the usual
``create_model`` arguments work. There are no pretrained weights for arbitrary anchors: use
``pretrained_anchors=True`` to start from each anchor's own timm weights.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from timm.models import generate_default_cfgs, register_model

from ..builder import stitch
from ..features import StitchedFeatures
from ..model import AnchorSpec, StitchedNet
from ._factory import anchor_cfg_fields, create_snnet, has_weight_source

__all__: list[str] = []

# no input size / classes of its own: those of the anchors apply (see ``_inherit_anchor_cfg``)
default_cfgs = generate_default_cfgs({
    'snnet': dict(url='', num_classes=None, input_size=None, pool_size=None, fixed_input_size=False,
                  first_conv='', classifier='', license='apache-2.0'),
})


def _inherit_anchor_cfg(model: StitchedNet) -> None:
    """Data settings from the smallest anchor's pretrained cfg; classifier / first conv names under ``anchors.i.``."""
    cfg = dict(model.pretrained_cfg, **anchor_cfg_fields([getattr(a, 'pretrained_cfg', None) or {}
                                                          for a in model.anchors]))
    cfg.setdefault('input_size', (model.in_chans, 224, 224))
    cfg['input_size'] = (model.in_chans, *cfg['input_size'][-2:])
    cfg['num_classes'] = model.num_classes
    model.pretrained_cfg = model.default_cfg = cfg


@register_model
def snnet(pretrained: bool = False, anchors: Optional[Sequence[AnchorSpec]] = None, **kwargs: Any) -> StitchedNet:
    """Stitch ``anchors`` (timm names, kwargs dicts or models, any order); options as for ``timm_stitch.stitch``."""
    if not anchors:
        raise ValueError("the 'snnet' architecture needs anchors, e.g. "
                         "timm.create_model('snnet', anchors=['convnext_atto', 'convnext_femto'])")
    if pretrained and not has_weight_source(kwargs.get('pretrained_cfg')):
        raise ValueError("the generic 'snnet' architecture has no pretrained weights of its own: load a saved one with "
                         "'hf-hub:ORG/REPO' or 'local-dir:PATH', pass pretrained_anchors=True to start from the "
                         "anchors' own weights, or use a registered snnet_* architecture")
    model = create_snnet('snnet', anchors, pretrained, builder=stitch, **kwargs)
    _inherit_anchor_cfg(model.model if isinstance(model, StitchedFeatures) else model)  # features_only: the network's
    return model
