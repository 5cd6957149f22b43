"""Loading the official SN-Net releases through timm's ``url`` + ``custom_load`` path, or its Hugging Face Hub path.

timm downloads a release file into its cache (``torch.hub`` ``checkpoints/``; for the SN-Netv2 releases, from the
authors' Hub repos with ``custom_load='hf'``, into the Hub cache) and calls the model's ``load_pretrained(file)``,
which lands here. The file's format decides what happens: an official release pickle is
read without executing pickled code, converted with the release's converter and cached as safetensors beside the
download (so the next load reads that and converts nothing); a safetensors file (or a ``torch.save`` state dict)
with this model's own keys loads as it is. The shipped route card of the release (MACs counted by timm-stitch, the
authors' reported accuracy) is attached after an official file.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

import safetensors.torch
from huggingface_hub import constants
from safetensors import SafetensorError, safe_open
from timm.models import resolve_pretrained_cfg

from .._download import download_url
from .._io import atomic_path
from .._timm_compat import get_cache_dir, resolve_pretrained_source
from ..convert import (
    OFFICIAL_FORMATS,
    OfficialFormat,
    StateDict,
    has_reported_card,
    map_official_keys,
    official_card,
    read_checkpoint,
)
from ..hub import check_pretrained_state_dict
from ..input_size import adapt_first_convs
from ..model import StitchedNet

__all__ = ['load_release', 'prepare_release_load', 'converted_path']

_logger = logging.getLogger(__name__)

_SAFETENSORS_HEADER = 8  # little-endian header length, then the JSON header starting with '{'


def _is_safetensors(path: Path) -> bool:
    with open(path, 'rb') as f:
        head = f.read(_SAFETENSORS_HEADER + 1)
    return len(head) == _SAFETENSORS_HEADER + 1 and head[-1:] == b'{'


def _layout_digest(model: StitchedNet) -> str:
    """Short digest of the model's keys and shapes: conversions for differently built models never collide."""
    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        h.update(f'{key}{tuple(value.shape)};'.encode())
    return h.hexdigest()[:12]


def converted_path(source: Path, model: StitchedNet) -> Path:
    """Where the conversion of the release file ``source`` for ``model`` is cached: beside ``source``."""
    arch = model.pretrained_cfg.get('architecture')
    return source.with_name(f'{source.stem}.{arch}.{_layout_digest(model)}.safetensors')


def _source_stamp(source: Path) -> dict[str, str]:
    stat = source.stat()
    return {'source': source.name, 'source_size': str(stat.st_size), 'source_mtime_ns': str(stat.st_mtime_ns)}


def _read_cached(cached: Path, source: Path) -> Optional[StateDict]:
    """The cached conversion when it was made from ``source`` as it is now, else None."""
    if not cached.is_file():
        return None
    try:
        with safe_open(str(cached), framework='pt') as f:
            if {k: v for k, v in (f.metadata() or {}).items() if k.startswith('source')} != _source_stamp(source):
                return None
        return safetensors.torch.load_file(str(cached))
    except (SafetensorError, OSError) as e:
        _logger.warning(f'ignoring the unreadable cached conversion {cached} ({e}); converting again')
        return None


_UNWRITABLE: set[Path] = set()  # cache folders already warned about


def _write_cached(state: StateDict, cached: Path, source: Path, fmt: OfficialFormat) -> None:
    """Write the conversion atomically (temp file renamed into place); a cache that cannot be written (read-only,
    full) warns once per folder."""
    metadata = {'format': 'pt', 'release': fmt.release, **_source_stamp(source)}
    try:
        with atomic_path(cached) as tmp:
            safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata=metadata)
    except (OSError, SafetensorError) as e:  # a read-only or full cache: the weights load from memory
        if cached.parent not in _UNWRITABLE:
            _UNWRITABLE.add(cached.parent)
            _logger.warning(f'cannot cache the converted weights at {cached} ({e}); they are loaded from memory, '
                            'and each load converts again until that folder can be written')


def load_release(model: StitchedNet, checkpoint_path: str) -> None:
    """timm's ``custom_load`` hook for the official releases: load ``checkpoint_path`` into ``model`` (see the
    module docstring). Raises ``ValueError`` naming the file and the release it should be when it is neither."""
    arch = model.pretrained_cfg.get('architecture')
    fmt = OFFICIAL_FORMATS[arch]
    path = Path(checkpoint_path)
    hub = f', also Hub {fmt.hf_hub[0]} {fmt.hf_hub[1]}' if fmt.hf_hub else ''
    expected = f'the {fmt.release} release file ({fmt.url}{hub}) or a converted {arch} safetensors file'
    if _is_safetensors(path):
        try:
            state = safetensors.torch.load_file(str(path))
        except SafetensorError as e:
            raise ValueError(f'{path} is a truncated or corrupt safetensors file ({e}); expected {expected}. Delete '
                             'it and download it again') from e
        _load_native(model, state)
        return
    cached = converted_path(path, model)
    state = _read_cached(cached, path)
    reset: list[str] = []
    if state is None:
        start = time.perf_counter()
        try:
            official = read_checkpoint(path, expected)
            if set(official) == set(model.state_dict()):  # a state dict of this model saved with torch.save
                _load_native(model, official)
                return
            heads = _reset_heads(model)
            state = map_official_keys(official, fmt, model, keep_mis_shaped=heads)
        except ValueError as e:
            raise ValueError(f'cannot load {path} as the pretrained weights of {arch}: {e}. If it is a cached '
                             'download, delete it so that it is downloaded again') from e
        own = model.state_dict()
        reset = [k for k in state if k.startswith(heads) and state[k].data_ptr() == own[k].data_ptr()] if heads else []
        _logger.info(f'converted {path} ({fmt.release}) in {time.perf_counter() - start:.1f} s')
        if reset:  # freshly initialised heads are not the release's weights: nothing to cache, no reported card
            _logger.info(f'{arch} has {model.num_classes} classes: {len(reset)} classifier tensors keep their init')
        else:
            _write_cached(state, cached, path, fmt)
    model.load_state_dict(state, strict=True)
    card = None if reset else official_card(model)
    if card is not None:
        model.load_card(card)
    elif has_reported_card(arch):
        _logger.info(f'{arch} is built with other routes or classes than the {fmt.release} release: its reported '
                     'route card is not attached')
    else:
        _logger.info(f'the authors published no per-route results for {fmt.release}: routes() has no accuracy')


def _load_native(model: StitchedNet, state: StateDict) -> None:
    """Load a state dict with ``model``'s own keys; heads of another ``num_classes`` keep their init, as in timm."""
    state = adapt_first_convs(check_pretrained_state_dict(state, model), model)  # now only heads may differ
    own = model.state_dict()
    state.update({k: own[k] for k, v in state.items() if v.shape != own[k].shape})
    model.load_state_dict(state, strict=True)


def _reset_heads(model: StitchedNet) -> tuple[str, ...]:
    """The classifier prefixes to keep as initialised: every head when ``model`` has other classes than the release
    (as timm does for any pretrained model), none otherwise."""
    cfg = model.pretrained_cfg
    if model.num_classes == cfg.get('num_classes'):
        return ()
    classifiers = cfg.get('classifier') or ()
    return tuple(f'{c}.' for c in ((classifiers,) if isinstance(classifiers, str) else classifiers))


def _offline() -> bool:
    return bool(constants.HF_HUB_OFFLINE) or os.environ.get('HF_HUB_OFFLINE', '').upper() in ('1', 'ON', 'YES',
                                                                                                'TRUE')


def prepare_release_load(variant: str, kwargs: dict[str, Any]) -> Optional[tuple[str, Path]]:
    """Before ``build_model_with_cfg`` loads ``variant``'s pretrained weights: keep ``custom_load`` when an overlay
    names another ``url``/``file`` (timm resets it, and its plain url path cannot read the releases' pickles), apply
    the release's compat settings unless an ``hf-hub:``/``local-dir:`` name brings its own config, and fail at once
    when offline and the download is not cached, else download it (see :mod:`timm_stitch._download`). Returns the
    URL and the cache file timm will read, or None when the weights come from elsewhere."""
    overlay = dict(kwargs.get('pretrained_cfg_overlay') or {})
    if any(overlay.get(k) for k in ('url', 'file')):
        overlay.setdefault('custom_load', True)
        kwargs['pretrained_cfg_overlay'] = overlay
    cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), overlay).to_dict()
    if cfg.get('source') in ('hf-hub', 'local-dir'):
        return None  # 'hf-hub:'/'local-dir:' names: the saved config.json says how the model was built
    for key, value in OFFICIAL_FORMATS[variant].model_kwargs.items():
        kwargs.setdefault(key, value)
    load_from, url = resolve_pretrained_source(cfg)
    if load_from != 'url' or not cfg.get('custom_load'):
        return None
    cache_dir = kwargs.get('cache_dir') or get_cache_dir()
    cached = Path(cache_dir) / os.path.basename(urlparse(url).path)
    if not cached.exists() and _offline():
        raise OSError(f'cannot load the pretrained weights of {variant}: HF_HUB_OFFLINE=1 is set and {url} is not '
                      f'in the cache (looked for {cached}). Download it once while online, or put the file there, '
                      "or load a local copy with pretrained_cfg_overlay=dict(file='path/to/file')")
    if not cached.exists():  # downloaded here, checked, so that timm finds a whole file
        download_url(url, cached, f'the pretrained weights of {variant}')
    return url, cached
