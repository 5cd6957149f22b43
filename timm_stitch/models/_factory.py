"""Shared pieces of the ``snnet_*`` architecture entry points."""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

from safetensors import SafetensorError
from timm.models import build_model_with_cfg

from .._timm_compat import resolve_pretrained_source
from ..anchors import check_anchor_sequence
from ..convert import OFFICIAL_FORMATS, OfficialFormat
from ..features import StitchedFeatures
from ..model import AnchorSpec, StitchedNet
from ..quantization import check_scheme, quantize
from ._loading import (
    check_pretrained_state_dict,
    load_pretrained_card,
    prepare_release_load,
    pretrained_errors,
    refetch_damaged,
)

__all__ = ['create_snnet', 'snnet_cfg', 'release_cfg', 'anchor_cfg_fields', 'has_weight_source', 'default_stitch_id',
           'RELEASE_URL', 'SNNET_PAPER', 'ANCHOR_DATA_KEYS']

#: where the official SN-Net (v1) releases are published
RELEASE_URL = 'https://github.com/ziplab/SN-Net/releases/download/'

#: the SN-Net paper, named in the pretrained cfgs of the registered architectures
SNNET_PAPER = dict(origin_url='https://github.com/ziplab/SN-Net', paper_ids='arXiv:2302.06586',
                   paper_name='Stitchable Neural Networks')

#: the route stitched networks built without a ``stitch_id`` make active (set by ``timm_stitch.run_script
#: --stitch-id``, for stock scripts that take no ``--model-kwargs``, such as timm's ``onnx_export.py``)
_DEFAULT_STITCH_ID: contextvars.ContextVar[Optional[int]] = contextvars.ContextVar('default_stitch_id', default=None)


@contextlib.contextmanager
def default_stitch_id(stitch_id: Optional[int]) -> Iterator[None]:
    """Within the body, registered stitched architectures built without ``stitch_id`` make route ``stitch_id``
    active (an explicit ``stitch_id`` still wins)."""
    token = _DEFAULT_STITCH_ID.set(stitch_id)
    try:
        yield
    finally:
        _DEFAULT_STITCH_ID.reset(token)


def _cfg_for_channels(model: StitchedNet) -> None:
    """Make ``model.pretrained_cfg`` describe the input channels the model was built with (``in_chans=3`` on the
    1-channel Fashion-MNIST model): ``input_size`` (and ``test_input_size``) take ``model.in_chans``, a
    single-value ``mean``/``std`` is repeated per channel (and a per-channel one averaged into one for other
    counts), so that timm's ``resolve_data_config`` (older stock scripts) prepares inputs the model takes."""
    cfg = dict(model.pretrained_cfg)
    chans = model.in_chans
    if (cfg.get('input_size') or (chans,))[0] == chans:
        return
    for key in ('input_size', 'test_input_size'):
        if cfg.get(key):
            cfg[key] = (chans, *cfg[key][1:])
    for key in ('mean', 'std'):
        value = tuple(cfg.get(key) or ())
        if value and len(value) != chans:
            cfg[key] = (value[0] if len(value) == 1 else sum(value) / len(value),) * chans
    model.pretrained_cfg = model.default_cfg = cfg


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


#: the data settings a stitched network takes from its smallest anchor's pretrained cfg
ANCHOR_DATA_KEYS = ('input_size', 'min_input_size', 'fixed_input_size', 'interpolation', 'crop_pct', 'crop_mode',
                    'mean', 'std')


def anchor_cfg_fields(cfgs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The pretrained-cfg fields a stitched network takes from its anchors' cfgs (smallest anchor first): the
    smallest anchor's data settings (:data:`ANCHOR_DATA_KEYS`) and first conv, and every anchor's classifier, the
    module names under ``anchors.i.``."""
    first = cfgs[0]
    fields = {k: first[k] for k in ANCHOR_DATA_KEYS if first.get(k) is not None}
    convs = first.get('first_conv')
    if convs:
        fields['first_conv'] = (f'anchors.0.{convs}' if isinstance(convs, str) else
                                tuple(f'anchors.0.{c}' for c in convs))
    classifiers = [cfg.get('classifier') for cfg in cfgs]
    if all(isinstance(c, str) and c for c in classifiers):
        fields['classifier'] = tuple(f'anchors.{i}.{c}' for i, c in enumerate(classifiers))
    return fields


def has_weight_source(cfg: Any) -> bool:
    """Whether the pretrained cfg (or overlay) ``cfg`` names weights to load: a file, Hub repo, URL or state dict."""
    cfg = cfg.to_dict() if hasattr(cfg, 'to_dict') else (cfg or {})
    return any(cfg.get(k) for k in ('file', 'hf_hub_id', 'url', 'state_dict'))


def _naming_anchor_errors(builder: Callable[..., StitchedNet], variant: str) -> Callable[..., StitchedNet]:
    """``builder`` whose missing downloads while building (the anchors' own weights, ``pretrained_anchors=True``)
    raise an error naming those anchors rather than the stitched network's weights."""
    def build(anchors: Sequence[AnchorSpec], **kwargs: Any) -> StitchedNet:
        with pretrained_errors(variant, anchors if kwargs.get('pretrained_anchors') else ()):
            return builder(anchors=anchors, **kwargs)
    return build


def release_cfg(fmt: OfficialFormat, num_anchors: int, **kwargs: Any) -> dict[str, Any]:
    """The pretrained cfg of the official SN-Net release ``fmt``: its URL, loaded by the model (``custom_load``);
    for a release the authors publish on the Hugging Face Hub, that repo and file first (``custom_load='hf'``), the
    URL being the fallback timm uses when ``huggingface_hub`` is missing or the cfg overlay clears ``hf_hub_id``."""
    source = dict(custom_load=True) if fmt.hf_hub is None else dict(
        custom_load='hf', hf_hub_id=fmt.hf_hub[0], hf_hub_filename=fmt.hf_hub[1])
    return snnet_cfg(num_anchors, url=fmt.url, **{**SNNET_PAPER, **source, **kwargs})


def _quantizing(builder: Callable[..., StitchedNet], scheme: str, stitches: Any) -> Callable[..., StitchedNet]:
    """``builder`` whose model is quantized before timm loads the pretrained weights into it (a quantized
    checkpoint loads as it is, a float one is quantized on the way: see ``check_pretrained_state_dict``)."""
    def build(**kwargs: Any) -> StitchedNet:
        return quantize(builder(**kwargs), scheme, stitches, inplace=True)
    return build


def _from_official_hub(variant: str, cfg: dict[str, Any]) -> bool:
    """Whether ``cfg`` loads ``variant``'s official release from the authors' Hub repo (no route card beside it)."""
    fmt = OFFICIAL_FORMATS.get(variant)
    if fmt is None or fmt.hf_hub is None:
        return False
    load_from, location = resolve_pretrained_source(cfg)
    return load_from == 'hf-hub' and isinstance(location, (tuple, list)) and tuple(location) == fmt.hf_hub


def create_snnet(
        variant: str,
        anchors: Sequence[AnchorSpec],
        pretrained: bool = False,
        builder: Callable[..., StitchedNet] = StitchedNet,
        **kwargs: Any,
) -> StitchedNet:
    """Build a registered stitched architecture through timm's ``build_model_with_cfg`` (``builder`` makes the model
    from ``anchors`` and the kwargs); with ``pretrained``, also load the route card: the official release's (see
    ``_loading``), or the ``routes.json`` found next to the weights. ``features_only=True`` (with ``out_indices``,
    ``feature_cfg=dict(norm=..., output_fmt=...)``) returns the network as a :class:`StitchedFeatures` backbone.
    ``quantize='int8-dyn'`` (and ``quantize_stitches``) builds the network quantized (see
    :func:`timm_stitch.quantize`), as the ``config.json`` of a saved quantized model asks."""
    check_anchor_sequence(anchors)  # before list(anchors) reads a name letter by letter
    features_only = kwargs.pop('features_only', False)
    scheme, stitches = kwargs.pop('quantize', None), kwargs.pop('quantize_stitches', None)
    if scheme is not None:
        builder = _quantizing(builder, check_scheme(scheme), stitches)
    features_args = dict(out_indices=kwargs.pop('out_indices', None), **(kwargs.pop('feature_cfg', None) or {}))
    kwargs.setdefault('pretrained_filter_fn', check_pretrained_state_dict)
    if _DEFAULT_STITCH_ID.get() is not None:
        kwargs.setdefault('stitch_id', _DEFAULT_STITCH_ID.get())
    with pretrained_errors(variant):
        release = prepare_release_load(variant, kwargs) if pretrained and variant in OFFICIAL_FORMATS else None
        build = _naming_anchor_errors(builder, variant)
        try:
            model = build_model_with_cfg(build, variant, pretrained, anchors=list(anchors), **kwargs)
        except SafetensorError as e:  # a damaged Hub cache entry is fetched again, once
            if not (pretrained and refetch_damaged(variant, kwargs, e)):
                raise
            model = build_model_with_cfg(build, variant, pretrained, anchors=list(anchors), **kwargs)
        # a release URL or Hub repo has no routes.json beside it: load_release attached the reported card, if any
        if pretrained and model.card is None and release is None and not _from_official_hub(variant,
                                                                                             model.pretrained_cfg):
            load_pretrained_card(model, cache_dir=kwargs.get('cache_dir'))
    _cfg_for_channels(model)
    return StitchedFeatures(model, **features_args) if features_only else model
