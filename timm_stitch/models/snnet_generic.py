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
from ..model import AnchorSpec, StitchedNet
from ._factory import create_snnet

__all__: list[str] = []

# no input size / classes of its own: those of the anchors apply (see ``_inherit_anchor_cfg``)
default_cfgs = generate_default_cfgs({
    'snnet': dict(url='', num_classes=None, input_size=None, pool_size=None, fixed_input_size=False,
                  first_conv='', classifier='', license='apache-2.0'),
})

_DATA_KEYS = ('input_size', 'min_input_size', 'fixed_input_size', 'interpolation', 'crop_pct', 'crop_mode', 'mean',
              'std')


def _inherit_anchor_cfg(model: StitchedNet) -> None:
    """Data settings from the smallest anchor's pretrained cfg; classifier / first conv names under ``anchors.i.``."""
    first = getattr(model.anchors[0], 'pretrained_cfg', None) or {}
    cfg = dict(model.pretrained_cfg, **{k: first[k] for k in _DATA_KEYS if first.get(k) is not None})
    cfg.setdefault('input_size', (model.in_chans, 224, 224))
    cfg['input_size'] = (model.in_chans, *cfg['input_size'][-2:])
    cfg['num_classes'] = model.num_classes
    if first.get('first_conv'):
        cfg['first_conv'] = f"anchors.0.{first['first_conv']}"
    classifiers = [getattr(a, 'pretrained_cfg', {}).get('classifier') for a in model.anchors]
    if all(isinstance(c, str) and c for c in classifiers):
        cfg['classifier'] = tuple(f'anchors.{i}.{c}' for i, c in enumerate(classifiers))
    model.pretrained_cfg = model.default_cfg = cfg


def _has_weight_source(cfg: Any) -> bool:
    cfg = cfg.to_dict() if hasattr(cfg, 'to_dict') else (cfg or {})
    return any(cfg.get(k) for k in ('file', 'hf_hub_id', 'url', 'state_dict'))


@register_model
def snnet(pretrained: bool = False, anchors: Optional[Sequence[AnchorSpec]] = None, **kwargs: Any) -> StitchedNet:
    """Stitch ``anchors`` (timm names, kwargs dicts or models, any order); options as for ``timm_stitch.stitch``."""
    if not anchors:
        raise ValueError("the 'snnet' architecture needs anchors, e.g. "
                         "timm.create_model('snnet', anchors=['convnext_atto', 'convnext_femto'])")
    if pretrained and not _has_weight_source(kwargs.get('pretrained_cfg')):
        raise ValueError("the generic 'snnet' architecture has no pretrained weights of its own: load a saved one with "
                         "'hf-hub:ORG/REPO' or 'local-dir:PATH', pass pretrained_anchors=True to start from the "
                         "anchors' own weights, or use a registered snnet_* architecture")
    model = create_snnet('snnet', anchors, pretrained, builder=stitch, **kwargs)
    _inherit_anchor_cfg(model)
    return model
