"""The generic reader and key mapper of the official SN-Net release checkpoints (ziplab/SN-Net v1.0-v1.2, and the
SN-Netv2 DeiT-3 pairs of ziplab/SN-Netv2 1.0, also on the Hugging Face Hub), and the registry of those releases.

Each release's URL, compat settings, stitching-layer key map and anchor filters are an :class:`OfficialFormat`
defined beside its entry point in ``timm_stitch/models/snnet_*.py`` and registered here (:func:`register_release`).

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
from importlib import resources
from typing import Any, Callable, Mapping, Optional, Union

import timm
import torch
from torch import nn

from ._io import file_sha256
from .cards import RouteCard
from .errors import ReleaseFormatError
from .model import StitchedNet

__all__ = ['OFFICIAL_FORMATS', 'OfficialFormat', 'register_release', 'deit_stitch_key', 'staged_stitch_key',
           'read_checkpoint', 'map_official_keys', 'convert_official', 'official_card']

PathLike = Union[str, os.PathLike]
StateDict = dict[str, torch.Tensor]

#: key parts of buffers the official checkpoints persist and timm rebuilds (or of split-BN training copies)
DROPPED_PARTS = ('aux_bn', 'relative_position_index', 'attn_mask', 'attention_bias_idxs')


@dataclass(frozen=True)
class OfficialFormat:
    """How one official release maps onto a registered architecture.

    ``url`` is the release file's URL; ``model_kwargs`` are the compat settings its weights
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


def deit_stitch_key(idx: tuple[int, ...]) -> Optional[tuple[int, int, int]]:
    """``stitch_layers.{pair}.{layer}`` of a one-token-stage release (DeiT) to ours (stage 0)."""
    return (0, *idx) if len(idx) == 2 else None


def staged_stitch_key(offset: int) -> Callable[[tuple[int, ...]], Optional[tuple[int, int, int]]]:
    """``stitch_layers.{stage}.{pair}.{layer}`` of a staged release to ours, its stages counted from ``offset``."""
    def mapping(idx: tuple[int, ...]) -> Optional[tuple[int, int, int]]:
        return (idx[0] + offset, idx[1], idx[2]) if len(idx) == 3 else None
    return mapping


#: the official release format of each registered architecture that has one, filled by the ``models/snnet_*.py``
#: files (each release beside its entry point and ``default_cfgs``) through :func:`register_release`
OFFICIAL_FORMATS: dict[str, OfficialFormat] = {}


def register_release(arch: str, fmt: OfficialFormat) -> OfficialFormat:
    """Record ``fmt`` as the official release format of the architecture ``arch``; returns ``fmt``."""
    OFFICIAL_FORMATS[arch] = fmt
    return fmt


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
        raise ReleaseFormatError(
            f'{path} is not a PyTorch checkpoint (expected {expected}, a torch.save file); it starts '
            f'with {head!r}')
    try:
        try:
            ckpt = torch.load(path, map_location='cpu', weights_only=True)
        except pickle.UnpicklingError:  # training args/configs in the pickle: read around them
            ckpt = torch.load(path, map_location='cpu', weights_only=False, pickle_module=_TENSOR_PICKLE)
    except Exception as e:  # torch raises RuntimeError, EOFError, zipfile/pickle errors... for damaged files
        raise ReleaseFormatError(
            f'{path} is not a readable PyTorch checkpoint (expected {expected}); it is truncated or '
            f'corrupt: {type(e).__name__}: {e}') from e
    if not isinstance(ckpt, Mapping):
        raise ReleaseFormatError(f'{path} holds a {type(ckpt).__name__}, not a checkpoint dict (expected {expected})')
    for key in ('model', 'state_dict'):
        if isinstance(ckpt.get(key), Mapping):
            ckpt = ckpt[key]
            break
    state = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in ckpt.items()}
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad or not state:
        raise ReleaseFormatError(
            f'{path} has no model/state_dict entry and its top level is not a state dict (expected '
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
        raise ReleaseFormatError(f'the checkpoint is not a {fmt.release} checkpoint for '
                                 f"{model.pretrained_cfg.get('architecture')} with these arguments: "
                                 + '; '.join(problems))
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
