"""Shared pieces of the ``snnet_*`` architecture entry points."""
from __future__ import annotations

from typing import Any, Callable, Sequence

from timm.models import build_model_with_cfg

from ..convert import OFFICIAL_FORMATS
from ..features import StitchedFeatures
from ..hub import check_pretrained_state_dict, load_pretrained_card, pretrained_errors
from ..model import AnchorSpec, StitchedNet
from ._release import prepare_release_load, release_download_errors

__all__ = ['create_snnet', 'snnet_cfg', 'release_cfg']


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


def _naming_anchor_errors(builder: Callable[..., StitchedNet], variant: str) -> Callable[..., StitchedNet]:
    """``builder`` whose missing downloads while building (the anchors' own weights, ``pretrained_anchors=True``)
    raise an error naming those anchors rather than the stitched network's weights."""
    def build(anchors: Sequence[AnchorSpec], **kwargs: Any) -> StitchedNet:
        with pretrained_errors(variant, anchors if kwargs.get('pretrained_anchors') else ()):
            return builder(anchors=anchors, **kwargs)
    return build


def release_cfg(arch: str, num_anchors: int, **kwargs: Any) -> dict[str, Any]:
    """The pretrained cfg of ``arch``'s official SN-Net release: its URL, loaded by the model (``custom_load``)."""
    fmt = OFFICIAL_FORMATS[arch]
    return snnet_cfg(num_anchors, url=fmt.url, custom_load=True, origin_url='https://github.com/ziplab/SN-Net',
                     paper_ids='arXiv:2302.06586', paper_name='Stitchable Neural Networks', **kwargs)


def create_snnet(
        variant: str,
        anchors: Sequence[AnchorSpec],
        pretrained: bool = False,
        builder: Callable[..., StitchedNet] = StitchedNet,
        **kwargs: Any,
) -> StitchedNet:
    """Build a registered stitched architecture through timm's ``build_model_with_cfg`` (``builder`` makes the model
    from ``anchors`` and the kwargs); with ``pretrained``, also load the route card: the official release's (see
    ``_release``), or the ``routes.json`` found next to the weights. ``features_only=True`` (with ``out_indices``,
    ``feature_cfg=dict(norm=..., output_fmt=...)``) returns the network as a :class:`StitchedFeatures` backbone."""
    features_only = kwargs.pop('features_only', False)
    features_args = dict(out_indices=kwargs.pop('out_indices', None), **(kwargs.pop('feature_cfg', None) or {}))
    kwargs.setdefault('pretrained_filter_fn', check_pretrained_state_dict)
    with pretrained_errors(variant):
        release = prepare_release_load(variant, kwargs) if pretrained and variant in OFFICIAL_FORMATS else None
        with release_download_errors(variant, release):
            model = build_model_with_cfg(_naming_anchor_errors(builder, variant), variant, pretrained,
                                         anchors=list(anchors), **kwargs)
        if pretrained and model.card is None and release is None:  # a release URL has no routes.json beside it
            load_pretrained_card(model, cache_dir=kwargs.get('cache_dir'))
    return StitchedFeatures(model, **features_args) if features_only else model
