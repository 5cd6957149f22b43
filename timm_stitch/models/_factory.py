"""Shared pieces of the ``snnet_*`` architecture entry points."""
from __future__ import annotations

from typing import Any, Callable, Sequence

from timm.models import build_model_with_cfg

from ..hub import check_pretrained_state_dict, load_pretrained_card, pretrained_errors
from ..model import AnchorSpec, StitchedNet

__all__ = ['create_snnet', 'snnet_cfg']


def snnet_cfg(num_anchors: int, url: str = '', **kwargs: Any) -> dict[str, Any]:
    """A default pretrained cfg for a stitched network; ``classifier`` names every anchor head."""
    return {
        'url': url,
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'pool_size': None,
        'crop_pct': 0.875,
        'interpolation': 'bicubic',
        'fixed_input_size': True,
        'first_conv': 'anchors.0.patch_embed.proj',
        'classifier': tuple(f'anchors.{i}.head' for i in range(num_anchors)),
        'license': 'apache-2.0',
        **kwargs,
    }


def create_snnet(
        variant: str,
        anchors: Sequence[AnchorSpec],
        pretrained: bool = False,
        builder: Callable[..., StitchedNet] = StitchedNet,
        **kwargs: Any,
) -> StitchedNet:
    """Build a registered stitched architecture through timm's ``build_model_with_cfg`` (``builder`` makes the model
    from ``anchors`` and the kwargs); with ``pretrained``, also load the route card (``routes.json``) found next to
    the weights."""
    kwargs.setdefault('pretrained_filter_fn', check_pretrained_state_dict)
    with pretrained_errors(variant):
        model = build_model_with_cfg(builder, variant, pretrained, anchors=list(anchors), **kwargs)
        if pretrained:
            load_pretrained_card(model, cache_dir=kwargs.get('cache_dir'))
    return model
