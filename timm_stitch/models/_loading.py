"""Loading pretrained stitched networks (timm-stitch's counterpart of timm's ``_builder.py``): the checkpoint
filter, the errors that say what to do when a download or file fails, the route card found next to the weights, and
the official SN-Net releases.

timm downloads a release file into its cache (``torch.hub`` ``checkpoints/``; for the SN-Netv2 releases, from the
authors' Hub repos with ``custom_load='hf'``, into the Hub cache) and calls the model's ``load_pretrained(file)``,
which lands in :func:`load_release`. The file's format decides what happens: an official release pickle is
read without executing pickled code, converted with the release's format (defined beside its entry point in
``models/snnet_*.py``) and cached as safetensors beside the download (so the next load reads that and converts
nothing); a safetensors file (or a ``torch.save`` state dict) with this model's own keys loads as it is. The shipped
route card of the release (MACs counted by timm-stitch, the authors' reported accuracy) is attached after an
official file. Other pretrained weights (a Hub repo, a local folder) load through timm's own path, filtered by
:func:`check_pretrained_state_dict`; :func:`load_pretrained_card` then fetches ``routes.json`` from the same place.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union
from urllib.parse import urlparse

import safetensors.torch
import torch
from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, OfflineModeIsEnabled
from safetensors import SafetensorError, safe_open
from timm.models import get_pretrained_cfg, resolve_pretrained_cfg
from torch import nn

from .._download import DownloadError, download_url
from .._io import atomic_path
from .._mismatch import WeightsMismatchError, mismatch_summary
from .._timm_compat import download_from_hf, get_cache_dir, resolve_pretrained_source
from ..bn import is_route_bn_key
from ..cards import RouteCard
from ..convert import (
    OFFICIAL_FORMATS,
    OfficialFormat,
    StateDict,
    has_reported_card,
    map_official_keys,
    official_card,
    read_checkpoint,
)
from ..errors import ReleaseFormatError
from ..hub import CARD_NAME, WEIGHTS_NAME
from ..input_size import adapt_first_convs, anchor_first_convs, filter_anchor_checkpoints, is_input_conv_mismatch
from ..model import StitchedNet
from ..quantization import quantize_state_dict

__all__ = [
    'load_release', 'prepare_release_load', 'converted_path', 'load_pretrained_card', 'check_pretrained_state_dict',
    'pretrained_errors', 'refetch_damaged',
]

_logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

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
            raise ReleaseFormatError(
                f'{path} is a truncated or corrupt safetensors file ({e}); expected {expected}. Delete '
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
            raise ReleaseFormatError(f'cannot load {path} as the pretrained weights of {arch}: {e}. If it is a cached '
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


# ---- pretrained weights from elsewhere (Hub repos, local files) -------------------------------------------

def load_pretrained_card(model: StitchedNet, cache_dir: Optional[PathLike] = None) -> Optional[RouteCard]:
    """Load ``routes.json`` from where ``model``'s pretrained weights came from (the same Hub repo, or the folder of
    a local file) onto the model; returns it, or None when that place has no card (a warning says so)."""
    load_from, location = resolve_pretrained_source(model.pretrained_cfg)
    path = None
    if load_from == 'hf-hub':
        repo = location[0] if isinstance(location, (tuple, list)) else location
        try:
            path = download_from_hf(repo, CARD_NAME, cache_dir=cache_dir)
        except EntryNotFoundError:
            path = None
    elif load_from in ('file', 'local-dir'):
        folder = Path(location) if load_from == 'local-dir' else Path(location).parent
        path = folder / CARD_NAME if (folder / CARD_NAME).is_file() else None
    if path is None:
        _logger.warning(f'no {CARD_NAME} route card next to the pretrained weights of '
                        f"{model.pretrained_cfg.get('architecture')} ({location!r}): routes() has no accuracy")
        return None
    card = RouteCard.load(path)
    model.load_card(card)
    return card


def check_pretrained_state_dict(state_dict: Mapping[str, torch.Tensor], model: StitchedNet) -> dict:
    """timm ``pretrained_filter_fn``: each anchor's part through its own timm checkpoint filter (position
    embeddings resampled to the size in use), then refuse a checkpoint whose keys or shapes are not exactly this
    model's (apart from the classifier heads, which timm resets when ``num_classes`` differs, and first-conv input
    channels, which timm adapts to ``in_chans``), naming what differs. A float checkpoint loaded into a quantized
    model is quantized first."""
    state_dict = filter_anchor_checkpoints(state_dict, model.anchors)
    if model.quant_scheme is not None:
        state_dict = quantize_state_dict(state_dict, model)
    expected = model.state_dict()
    heads = tuple(f'{c}.' for c in _classifiers(model))
    first_convs = anchor_first_convs(model.anchors)
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected and not is_route_bn_key(k)]  # checked by the load
    misshaped = [f'{k} {tuple(state_dict[k].shape)} in the file, {tuple(v.shape)} in the model'
                 for k, v in expected.items()
                 if k in state_dict and state_dict[k].shape != v.shape and not k.startswith(heads)
                 and not is_input_conv_mismatch(k, state_dict[k], v, first_convs)]
    if not (missing or unexpected or misshaped):
        return dict(state_dict)
    arch = model.pretrained_cfg.get('architecture')
    if any(_is_official_stitch_key(k) for k in unexpected):
        raise ReleaseFormatError(
            f'this is an official SN-Net release checkpoint, not a {arch} checkpoint: convert it first '
            f'with `timm-stitch convert CHECKPOINT --arch {arch} --out DIR`')
    mismatch = mismatch_summary(missing, unexpected, misshaped)
    raise WeightsMismatchError(f'the pretrained checkpoint holds the weights of another architecture (or of other '
                               f'model arguments) than {arch}: {mismatch}{_lora_hint(state_dict, expected)}')


def _lora_hint(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> str:
    """What to build when the checkpoint's stitching layers have another low-rank update rank than the model's."""
    def ranks(state: Mapping[str, torch.Tensor]) -> set[int]:
        return {v.shape[0] for k, v in state.items() if k.startswith('stitch_layers.') and k.endswith('.lora_A')}

    saved = ranks(state_dict)
    if saved == ranks(expected):
        return ''
    return f' (its stitching layers were saved with stitch_lora_rank={min(saved) if saved else 0}: build with that)'


def _classifiers(model: nn.Module) -> tuple[str, ...]:
    classifiers = model.pretrained_cfg.get('classifier') or ()
    return (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)


def _is_official_stitch_key(key: str) -> bool:
    parts = key.split('.')
    return parts[0] == 'stitch_layers' and len(parts) == 5 and parts[3] == 'transform'


@contextmanager
def pretrained_errors(variant: str, anchors: Sequence[Any] = ()) -> Iterator[None]:
    """Turn download and file errors while loading ``variant``'s pretrained weights into errors that say what to do.

    ``anchors``: the anchor specs being built with their own pretrained weights (``pretrained_anchors=True``);
    a missing download then names those anchors rather than the stitched network's weights.
    """
    try:
        yield
    except LocalEntryNotFoundError as e:
        where = 'HF_HUB_OFFLINE=1 is set' if constants.HF_HUB_OFFLINE else \
            f'the Hugging Face Hub ({constants.ENDPOINT}) is unreachable'
        names = [_anchor_source(a) for a in anchors if not isinstance(a, nn.Module)]
        if names:
            raise OSError(
                f'cannot build {variant} with pretrained_anchors=True: {where} and the pretrained weights of its '
                f'anchors {", ".join(names)} are not all in the cache ({constants.HF_HUB_CACHE}). Create the model '
                'once while online to cache them (then HF_HUB_OFFLINE=1 works), pass built anchor models instead of '
                'names, or leave pretrained_anchors=False'
            ) from e
        raise OSError(
            f'cannot load the pretrained weights of {variant}: {where} and they are not in the cache '
            f'({constants.HF_HUB_CACHE}). Download them once while online, then set HF_HUB_OFFLINE=1 to use the '
            "cache; or load a local file with pretrained_cfg_overlay=dict(file='path/to/model.safetensors')."
        ) from e
    except SafetensorError as e:
        raise ValueError(f'the pretrained weights of {variant} are corrupt or truncated ({e}); delete the file (or '
                         'its Hub cache entry) and download it again') from e
    except Exception as e:
        lost = None if isinstance(e, DownloadError) else _network_cause(e)
        if lost is None:
            raise
        url = _request_url(e) or constants.ENDPOINT
        why = (f'the server sent nothing for {constants.HF_HUB_DOWNLOAD_TIMEOUT} s (HF_HUB_DOWNLOAD_TIMEOUT, in '
               'seconds)') if isinstance(lost, TimeoutError) or 'Timeout' in type(lost).__name__ else \
            f'the connection was lost ({type(lost).__name__}: {lost})'
        raise DownloadError(f'cannot download the pretrained weights of {variant} from {url} into the Hub cache '
                            f'{constants.HF_HUB_CACHE}: {why}. The part received is kept there as an .incomplete file '
                            'that the next try resumes: try again, or set HF_HUB_OFFLINE=1 to use what is cached'
                            ) from e


def _network_cause(error: BaseException) -> Optional[BaseException]:
    """The network failure (a lost or timed-out connection: Python's, or the Hub client's HTTP library's) that
    ``error`` is or was raised from, else None."""
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, (LocalEntryNotFoundError, OfflineModeIsEnabled)):  # offline: said as such
            return None
        if isinstance(error, (ConnectionError, TimeoutError)) or type(error).__module__.split('.')[0].startswith(
                ('httpx', 'httpcore')) and type(error).__name__.endswith(('Error', 'Timeout')):
            return error
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


def _request_url(error: BaseException) -> Optional[str]:
    try:
        return str(error.request.url)  # httpx errors; the property raises when unset
    except (AttributeError, RuntimeError):
        return None


def refetch_damaged(variant: str, kwargs: Mapping[str, Any], error: BaseException) -> bool:
    """After a ``SafetensorError`` loading ``variant``'s pretrained weights (built with ``kwargs``): when the file
    read is a damaged Hub cache entry and the Hub can be reached, download it again (``force_download``) and return
    True, so that the caller builds again; a damaged file that cannot be fetched again raises a ``ValueError`` naming
    its path. False when the damaged file is not found (the caller re-raises ``error``)."""
    cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'))
    load_from, location = resolve_pretrained_source(cfg.to_dict())
    if load_from == 'file':
        path, repo, name = Path(location), None, None
    elif load_from == 'hf-hub':
        repo, name = location if isinstance(location, (tuple, list)) else (location, None)
        names = [n for n in (name, WEIGHTS_NAME, (name or '').replace('pytorch_model.bin', WEIGHTS_NAME)) if n]
        found = [(n, try_to_load_from_cache(repo, n, cache_dir=kwargs.get('cache_dir'))) for n in names]
        name, path = next(((n, Path(p)) for n, p in found if isinstance(p, str) and _damaged(Path(p))), (None, None))
    else:
        return False
    if path is None or not _damaged(path):
        return False
    if repo is not None and not constants.HF_HUB_OFFLINE:
        _logger.warning(f'the Hub cache file {path} of {repo}/{name} is truncated or corrupt ({error}): '
                        'downloading it again')
        hf_hub_download(repo, name, cache_dir=kwargs.get('cache_dir'), force_download=True)
        return True
    fix = (f'delete it and load again with the Hub reachable (HF_HUB_OFFLINE=1 is set), or download {repo}/{name} '
           'again with force_download=True') if repo is not None else 'copy or download it again'
    raise ValueError(f'the pretrained weights of {variant} at {path} are truncated or corrupt ({error}): {fix}'
                     ) from error


def _damaged(path: Path) -> bool:
    """Whether ``path`` is a safetensors file that cannot be read whole."""
    if path.suffix != '.safetensors' or not path.is_file():
        return False
    try:
        safetensors.torch.load_file(str(path))
    except SafetensorError:
        return True
    return False


def _anchor_source(spec: Any) -> str:
    """An anchor spec (name or kwargs dict) as ``name (Hub repo)``: where its timm weights come from."""
    name = spec.get('model_name', '?') if isinstance(spec, Mapping) else str(spec)
    cfg = get_pretrained_cfg(name)
    return f'{name} ({cfg.hf_hub_id})' if cfg is not None and cfg.hf_hub_id else name
