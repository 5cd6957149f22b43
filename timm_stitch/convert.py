"""Converters from the official SN-Net release checkpoints (ziplab/SN-Net v1.0-v1.2, and the SN-Netv2 DeiT-3 pairs
of ziplab/SN-Netv2 1.0, also on the Hugging Face Hub) to timm-stitch models.

The checkpoints (zip or legacy ``torch.save`` files) are read without running pickled code:
``torch.load(weights_only=True)``, or, when the pickle also holds training arguments or configs (argparse/yacs
objects), an unpickler that builds tensors and containers only and turns every other object into an inert
placeholder. Every key is mapped (``module.`` stripped; persistent index
buffers and split-BN ``aux_bn`` copies dropped; stitching-layer indices moved to ``stitch_layers.{stage}.{pair}.
{layer}``; each anchor through its timm family's own ``checkpoint_filter_fn`` where the layout changed), the compat
flags the official code needs are set, and any unmatched, missing or mis-shaped key is an error.
"""
from __future__ import annotations

import os
import pickle
import re
import types
from dataclasses import dataclass, field
from functools import partial
from importlib import resources
from typing import Any, Callable, Mapping, Optional, Union

import timm
import torch
from timm.models.swin_transformer import checkpoint_filter_fn as swin_filter
from timm.models.vision_transformer import checkpoint_filter_fn as vit_filter
from torch import nn

from ._io import file_sha256
from .cards import RouteCard
from .model import StitchedNet

__all__ = ['OFFICIAL_FORMATS', 'OfficialFormat', 'read_checkpoint', 'convert_official']

PathLike = Union[str, os.PathLike]
StateDict = dict[str, torch.Tensor]

#: key parts of buffers the official checkpoints persist and timm rebuilds (or of split-BN training copies)
DROPPED_PARTS = ('aux_bn', 'relative_position_index', 'attn_mask', 'attention_bias_idxs')


@dataclass(frozen=True)
class OfficialFormat:
    """How one official release maps onto a registered architecture.

    ``url`` is the release file (relative to ``RELEASE_URL``); ``model_kwargs`` are the compat settings its weights
    need; ``stitch_key`` maps the indices after ``stitch_layers.`` (official order) to ours; ``anchor_filters``
    convert an anchor's official keys (prefix stripped) to timm's; ``hf_hub`` is the (repo id, file name) the
    authors publish the same file under on the Hugging Face Hub, if they do. The authors' per-route results ship
    in ``timm_stitch/data/reported/{architecture}.jsonl`` and the route card built from them in
    ``{architecture}.routes.json``, where they published them.
    """
    release: str
    url: str
    model_kwargs: dict[str, Any]
    stitch_key: Callable[[tuple[int, ...]], Optional[tuple[int, int, int]]]
    anchor_filters: dict[int, Callable[[StateDict, nn.Module], StateDict]] = field(default_factory=dict)
    hf_hub: Optional[tuple[str, str]] = None


def _deit_stitch(idx: tuple[int, ...]) -> Optional[tuple[int, int, int]]:
    return (0, *idx) if len(idx) == 2 else None  # stitch_layers.{pair}.{layer}: one token stage


def _staged_stitch(offset: int) -> Callable[[tuple[int, ...]], Optional[tuple[int, int, int]]]:
    def mapping(idx: tuple[int, ...]) -> Optional[tuple[int, int, int]]:
        return (idx[0] + offset, idx[1], idx[2]) if len(idx) == 3 else None
    return mapping


_LEVIT_UNIT = {  # official (FB LeViT) child -> timm child, inside one flat ``blocks`` entry
    'attn': {'m.qkv': 'qkv', 'm.proj.1': 'proj.ln', 'm.attention_biases': 'attention_biases'},
    'mlp': {'m.0': 'ln1', 'm.2': 'ln2'},
    'attn_downsample': {'kv': 'kv', 'q.1': 'q.ln', 'proj.1': 'proj.ln', 'attention_biases': 'attention_biases'},
}
#: Conv2d_BN / Linear_BN / BN_Linear children -> ConvNorm / LinearNorm / NormLinear children
_LEVIT_PARTS = {'c': 'linear', 'bn': 'bn', 'l': 'linear'}


def levit_filter(state: StateDict, model: nn.Module) -> StateDict:
    """Facebook LeViT keys (``patch_embed.{0,2,4,6}``, one flat ``blocks`` Sequential, ``head{,_dist}.{bn,l}``) to
    timm's (``stem.conv{1-4}``, ``stages.{s}.[downsample.]``, ``head{,_dist}.{bn,linear}``).

    The flat block index is mapped by walking timm's stages in order: a stage's downsample (AttentionSubsample +
    Residual(MLP), 2 entries) comes first, then 2 entries (attention, MLP) per block. A key that fits none of
    the patterns is passed through unchanged, so that the caller reports it as unmatched; shapes are checked there.
    """
    units: list[tuple[str, str]] = []  # flat official index -> (timm prefix, unit kind)
    for s, stage in enumerate(model.stages):
        if not isinstance(stage.downsample, nn.Identity):
            units += [(f'stages.{s}.downsample.attn_downsample.', 'attn_downsample'),
                      (f'stages.{s}.downsample.mlp.', 'mlp')]
        for b in range(len(stage.blocks)):
            units += [(f'stages.{s}.blocks.{b}.attn.', 'attn'), (f'stages.{s}.blocks.{b}.mlp.', 'mlp')]
    out: StateDict = {}
    for key, value in state.items():
        new = key
        if m := re.fullmatch(r'patch_embed\.([0246])\.(c|bn)\.(.+)', key):
            new = f'stem.conv{int(m.group(1)) // 2 + 1}.{_LEVIT_PARTS[m.group(2)]}.{m.group(3)}'
        elif m := re.fullmatch(r'(head|head_dist)\.(bn|l)\.(.+)', key):
            new = f'{m.group(1)}.{_LEVIT_PARTS[m.group(2)]}.{m.group(3)}'
        elif (m := re.fullmatch(r'blocks\.(\d+)\.(.+)', key)) and int(m.group(1)) < len(units):
            prefix, kind = units[int(m.group(1))]
            rest = m.group(2)
            for src, dst in _LEVIT_UNIT[kind].items():
                if rest == src:
                    new = prefix + dst
                elif rest.startswith(src + '.') and (p := re.fullmatch(r'(c|bn)\.(.+)', rest[len(src) + 1:])):
                    new = f'{prefix}{dst}.{_LEVIT_PARTS[p.group(1)]}.{p.group(2)}'
        out[new] = value
    return out


#: where the official SN-Net releases are published
RELEASE_URL = 'https://github.com/ziplab/SN-Net/releases/download/'
RELEASE_URL_V2 = 'https://github.com/ziplab/SN-Netv2/releases/download/'

#: DeiT-3 (FB ``vit_models``) keys to timm's: ``blocks.N.gamma_{1,2}`` become ``blocks.N.ls{1,2}.gamma``
deit3_filter = partial(vit_filter, adapt_layer_scale=True)


def _snnetv2_deit3(pair: str) -> OfficialFormat:
    """The SN-Netv2 DeiT-3 release of ``pair`` (``s_l``...): two anchors, ``stitch_layers.{0,1}.{layer}`` for the
    small->large and large->small layers (our pairs 0 and 1 of the one token stage)."""
    name = f'snnetv2_deit3_{pair}'
    return OfficialFormat(f'ziplab/SN-Netv2 1.0 {name}.pth', f'{RELEASE_URL_V2}1.0/{name}.pth', {}, _deit_stitch,
                          {i: deit3_filter for i in range(2)}, hf_hub=(f'ziplab/{name}_imagenet_1k', f'{name}.pth'))


OFFICIAL_FORMATS: dict[str, OfficialFormat] = {
    'snnet_deit_tsb': OfficialFormat(
        'ziplab/SN-Net v1.0 snnet_deit.pth', RELEASE_URL + 'v1.0/snnet_deit.pth',
        dict(final_norm_on_stitched_routes=False), _deit_stitch),
    'snnet_swin_tsb': OfficialFormat(
        'ziplab/SN-Net v1.0 snnet_swin.pth', RELEASE_URL + 'v1.0/snnet_swin.pth', dict(layer_mapping='official'),
        _staged_stitch(0), {i: swin_filter for i in range(3)}),
    'snnet_resnet_18_50': OfficialFormat(
        'ziplab/SN-Net v1.1 resnet_18_50.pth', RELEASE_URL + 'v1.1/resnet_18_50.pth', dict(layer_mapping='official'),
        _staged_stitch(1)),
    'snnet_resnet18_swin_ti': OfficialFormat(
        'ziplab/SN-Net v1.1 resnet18_swin_ti.pth', RELEASE_URL + 'v1.1/resnet18_swin_ti.pth',
        dict(layer_mapping='official'), _staged_stitch(1), {1: swin_filter}),
    'snnet_levit_192_256': OfficialFormat(
        'ziplab/SN-Net v1.2 levit_192_256_release.pth', RELEASE_URL + 'v1.2/levit_192_256_release.pth', {},
        _staged_stitch(0), {i: levit_filter for i in range(2)}),
    'snnet_deit3_sb': _snnetv2_deit3('s_b'),
    'snnet_deit3_sl': _snnetv2_deit3('s_l'),
    'snnet_deit3_bl': _snnetv2_deit3('b_l'),
}


# ---- reading ----------------------------------------------------------------------------------------------------

class _Inert(dict):
    """Stands in for any pickled object that is not a tensor or a container: built from nothing, runs nothing."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Inert:
        return dict.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()

    def __setstate__(self, state: Any) -> None:
        pass

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass


_ALLOWED = {
    ('collections', 'OrderedDict'), ('torch._utils', '_rebuild_tensor_v2'), ('torch._utils', '_rebuild_parameter'),
    ('torch', 'Size'), ('builtins', 'set'), ('builtins', 'frozenset'), ('builtins', 'slice'),
}


class _TensorUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED or (module == 'torch' and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        return _Inert


def _tensor_only_load(file: Any, **kwargs: Any) -> Any:
    return _TensorUnpickler(file, **kwargs).load()


# what torch.load needs of a pickle module: zip files use Unpickler, legacy files also load
_TENSOR_PICKLE = types.SimpleNamespace(Unpickler=_TensorUnpickler, load=_tensor_only_load,
                                       __name__='tensor_only_pickle')
_ZIP_MAGIC, _PICKLE_PROTO = b'PK\x03\x04', b'\x80'


def read_checkpoint(path: PathLike, expected: str = 'an official SN-Net checkpoint') -> StateDict:
    """The tensors of a ``torch.save`` checkpoint, zip or legacy format (under ``model``, ``state_dict`` or at the
    top level), never executing pickled code; ``module.`` prefixes stripped.

    Raises ``ValueError`` naming the file and ``expected`` when it is not such a checkpoint (another format, or a
    truncated or corrupt file).
    """
    with open(path, 'rb') as f:
        head = f.read(8)
    if not (head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_PROTO)):
        raise ValueError(f'{path} is not a PyTorch checkpoint (expected {expected}, a torch.save file); it starts '
                         f'with {head!r}')
    try:
        try:
            ckpt = torch.load(path, map_location='cpu', weights_only=True)
        except pickle.UnpicklingError:  # training args/configs in the pickle: read around them
            ckpt = torch.load(path, map_location='cpu', weights_only=False, pickle_module=_TENSOR_PICKLE)
    except Exception as e:  # torch raises RuntimeError, EOFError, zipfile/pickle errors... for damaged files
        raise ValueError(f'{path} is not a readable PyTorch checkpoint (expected {expected}); it is truncated or '
                         f'corrupt: {type(e).__name__}: {e}') from e
    if not isinstance(ckpt, Mapping):
        raise ValueError(f'{path} holds a {type(ckpt).__name__}, not a checkpoint dict (expected {expected})')
    for key in ('model', 'state_dict'):
        if isinstance(ckpt.get(key), Mapping):
            ckpt = ckpt[key]
            break
    state = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in ckpt.items()}
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad or not state:
        raise ValueError(f'{path} has no model/state_dict entry and its top level is not a state dict (expected '
                         f'{expected}): {", ".join(map(str, bad[:5])) or "it is empty"}')
    return state


# ---- mapping ----------------------------------------------------------------------------------------------------

def map_official_keys(state: StateDict, fmt: OfficialFormat, model: StitchedNet,
                      keep_mis_shaped: tuple[str, ...] = ()) -> StateDict:
    """Official keys to ``model``'s, raising ``ValueError`` listing every unmatched, missing or mis-shaped key.

    Mis-shaped tensors under the prefixes ``keep_mis_shaped`` (classifier heads of a model built with other
    ``num_classes``) are not errors: the model's own values are kept there, as timm resets a pretrained head.
    """
    anchors: dict[int, StateDict] = {}
    out: StateDict = {}
    origin: dict[str, str] = {}  # our key -> the official one, for error messages
    unmatched = []
    for key, value in state.items():
        key = key[len('module.'):] if key.startswith('module.') else key
        if any(part in DROPPED_PARTS for part in key.split('.')):
            continue
        m = re.fullmatch(r'anchors\.(\d+)\.(.+)', key)
        s = re.fullmatch(r'stitch_layers\.((?:\d+\.)+)(transform\..+)', key)
        if m and int(m.group(1)) < len(model.anchors):
            anchors.setdefault(int(m.group(1)), {})[m.group(2)] = value
        elif s and (idx := fmt.stitch_key(tuple(int(i) for i in s.group(1)[:-1].split('.')))) is not None:
            ours = 'stitch_layers.{}.{}.{}.'.format(*idx) + s.group(2)
            out[ours], origin[ours] = value, key
        else:
            unmatched.append(key)
    for i, sub in anchors.items():
        if i in fmt.anchor_filters:
            sub = fmt.anchor_filters[i](sub, model.anchors[i])
        out.update({f'anchors.{i}.{k}': v for k, v in sub.items()})
    expected = model.state_dict()
    unmatched += [origin.get(k, k) for k in out if k not in expected]
    missing = [k for k in expected if k not in out]
    kept = [k for k, v in out.items() if k in expected and v.shape != expected[k].shape and k.startswith(
        keep_mis_shaped)] if keep_mis_shaped else []
    out.update({k: expected[k] for k in kept})
    misshaped = [f'{k} {tuple(v.shape)} (expected {tuple(expected[k].shape)})' for k, v in out.items()
                 if k in expected and v.shape != expected[k].shape]
    problems = [f'{len(keys)} {what}: {", ".join(keys[:6])}{", ..." if len(keys) > 6 else ""}'
                for what, keys in (('unmatched', unmatched), ('missing', missing), ('mis-shaped', misshaped)) if keys]
    if problems:
        raise ValueError(f'the checkpoint is not a {fmt.release} checkpoint for '
                         f"{model.pretrained_cfg.get('architecture')} with these arguments: " + '; '.join(problems))
    return out


def convert_official(
        checkpoint: Union[PathLike, StateDict],
        arch: str = 'snnet_deit_tsb',
        **model_kwargs: Any,
) -> StitchedNet:
    """Build ``arch`` with the official compat flags and load an official release checkpoint into it (strictly).

    ``model_kwargs`` (``num_classes``, ``img_size``, ``depth``...) must describe the checkpoint. The authors'
    reported per-route accuracy is attached as the model's card (marked ``reported``) when the model has the
    release's routes.
    """
    fmt = official_format(arch)
    path = None if isinstance(checkpoint, Mapping) else checkpoint
    model = timm.create_model(arch, **{**fmt.model_kwargs, **model_kwargs}).eval()
    state = dict(checkpoint) if path is None else read_checkpoint(path, f'the {fmt.release} release file')
    model.load_state_dict(map_official_keys(state, fmt, model), strict=True)
    card = official_card(model, path)
    if card is not None:
        model.load_card(card)
    return model


def official_format(arch: str) -> OfficialFormat:
    """The official release format of ``arch``; ``ValueError`` naming the valid architectures otherwise."""
    if arch not in OFFICIAL_FORMATS:
        raise ValueError(f'no official checkpoint format for {arch!r}: valid are {", ".join(OFFICIAL_FORMATS)}')
    return OFFICIAL_FORMATS[arch]


def _reported_card(arch: str) -> Any:
    return resources.files('timm_stitch') / 'data' / 'reported' / f'{arch}.routes.json'


def has_reported_card(arch: str) -> bool:
    """Whether the authors' per-route results of ``arch``'s release ship as a route card (not every release has
    published results: of the SN-Netv2 DeiT-3 pairs, only S-L)."""
    return _reported_card(arch).is_file()


def official_card(model: StitchedNet, checkpoint: Optional[PathLike] = None) -> Optional[RouteCard]:
    """The route card shipped for ``model``'s official release (MACs counted by timm-stitch, the authors' reported
    accuracy, keyed to the weights ``model`` holds: the release's, just loaded), or None when the model does not
    have the release's routes (e.g. built smaller) or the authors published no per-route results for it.
    ``checkpoint``, when given, is the file whose sha256 the card's provenance records."""
    arch = model.pretrained_cfg.get('architecture')
    official_format(arch)
    if not has_reported_card(arch):
        return None
    with resources.as_file(_reported_card(arch)) as path:
        card = RouteCard.load(path)
    try:
        card.check_model(model)
    except ValueError:
        return None
    if checkpoint is not None:
        card.provenance.append({'what': 'weights', 'release': OFFICIAL_FORMATS[arch].release,
                                'checkpoint_sha256': file_sha256(checkpoint)})
    return card.keyed_to(model)
