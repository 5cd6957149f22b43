"""Publishing stitched models to the Hugging Face Hub and loading their route cards next to the weights.

A published folder (or Hub repo) holds ``config.json`` (architecture, ``model_args``, ``pretrained_cfg``, written by
timm's own ``save_config_for_hf``), ``model.safetensors``, ``routes.json`` (the route card) and a ``README.md`` model
card rendered from it. ``timm.create_model(arch, pretrained=True)`` and ``timm.create_model('hf-hub:ORG/REPO')`` load
the weights through timm's pretrained machinery; :func:`load_pretrained_card` then fetches ``routes.json`` from the same
place, so ``routes()`` carries the card's accuracy without evaluating anything.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional, Sequence, Union

import safetensors.torch
import torch
from huggingface_hub import HfApi, constants, hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, OfflineModeIsEnabled
from safetensors import SafetensorError
from timm.models import get_pretrained_cfg, is_model, resolve_pretrained_cfg, save_for_hf
from torch import nn

from ._download import DownloadError
from ._io import atomic_dir
from ._mismatch import WeightsMismatchError, mismatch_summary
from ._timm_compat import download_from_hf, resolve_pretrained_source, save_config_for_hf
from .bn import is_route_bn_key
from .card_readme import is_rendered_readme, render_readme
from .cards import RouteCard
from .catalogue import staleness, state_key, weights_key
from .input_size import anchor_first_convs, filter_anchor_checkpoints, is_input_conv_mismatch
from .quantize import quantization_args, quantize_state_dict
from .stitching import merged_lora_state, stitch_lora_args
from .unwrap import is_stitched, unwrap

if TYPE_CHECKING:
    from .model import StitchedNet

__all__ = [
    'save_pretrained', 'push_to_hub', 'load_pretrained_card', 'check_pretrained_state_dict', 'pretrained_errors',
    'refetch_damaged',
    'CONFIG_NAME', 'WEIGHTS_NAME', 'CARD_NAME', 'README_NAME',
]

_logger = logging.getLogger(__name__)

CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, README_NAME = 'config.json', 'model.safetensors', 'routes.json', 'README.md'
PathLike = Union[str, os.PathLike]


# ---- saving and publishing --------------------------------------------------------------------------------------

def save_pretrained(
        model: nn.Module,
        save_directory: PathLike,
        card: Optional[RouteCard] = None,
        model_args: Optional[Mapping[str, Any]] = None,
        repo_id: Optional[str] = None,
        merge_lora: bool = False,
) -> Path:
    """Write a Hub-ready folder: ``config.json``, ``model.safetensors``, ``routes.json`` and ``README.md``.

    ``model`` is a stitched model built by a registered ``snnet_*`` architecture (its card defaults to the model's
    counted MACs and params plus the accuracy and latency of its loaded card), or a plain timm model such as an
    exported anchor route (weights and ``config.json`` only, as timm writes them); a model inside
    ``torch.compile``, DDP or DataParallel is saved as the model itself. A new folder is built next to
    ``save_directory`` and renamed into place, so a failure leaves nothing half-written. An existing folder must be
    empty or hold a saved model: its files are replaced one by one (a ``README.md`` only when timm-stitch rendered
    it), other files stay; a folder with other files (or a file) raises ``ForeignFilesError`` (a
    ``FileExistsError``) and nothing is written.

    Low-rank stitching layers (``stitch_lora_rank > 0``) are saved as they are (``weight``, ``lora_A``, ``lora_B``:
    training can go on from them) unless ``merge_lora``: then each is saved merged into a plain linear layer and
    ``config.json`` says ``stitch_lora_rank=0``, so the folder loads as a model with plain stitching layers that
    computes the same (the card's accuracies are keyed to the merged weights).
    """
    model = unwrap(model)
    target = Path(save_directory)
    owned = [CONFIG_NAME, WEIGHTS_NAME, CARD_NAME] + ([README_NAME] if is_rendered_readme(target / README_NAME) else [])
    with atomic_dir(target, owned, is_ours=_holds_saved_model, what='save_pretrained') as tmp:
        if is_stitched(model):
            _write_stitched(model, tmp, card, dict(model_args or {}), repo_id or target.name, merge_lora)
        elif not is_model((getattr(model, 'pretrained_cfg', None) or {}).get('architecture') or ''):
            raise TypeError(
                f'cannot save a {type(model).__name__} as a timm model: only stitched models of a registered '
                'architecture and timm models (such as exported anchor routes) can be saved; export a stitched '
                'route with torch.export or ONNX, or save the whole stitched model')
        else:
            save_for_hf(model, str(tmp), model_args=dict(model_args or {}), safe_serialization=True)
    return target


def push_to_hub(
        model: nn.Module,
        repo_id: str,
        card: Optional[RouteCard] = None,
        model_args: Optional[Mapping[str, Any]] = None,
        commit_message: str = 'Add stitched model',
        token: Optional[str] = None,
        revision: Optional[str] = None,
        private: Optional[bool] = None,
        create_pr: bool = False,
        merge_lora: bool = False,
) -> Any:
    """Save ``model`` as :func:`save_pretrained` does and upload the folder to ``repo_id`` in one commit
    (``HfApi.upload_folder``; the repo is created when missing). Returns the ``huggingface_hub`` ``CommitInfo``."""
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_pretrained(model, Path(tmp) / 'repo', card=card, model_args=model_args, repo_id=repo_id,
                                 merge_lora=merge_lora)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message,
                                 revision=revision, create_pr=create_pr)


def _write_stitched(model: StitchedNet, folder: Path, card: Optional[RouteCard], model_args: dict,
                    repo_id: str, merge_lora: bool) -> None:
    arch = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture')
    if not arch or not is_model(arch):
        raise ValueError(
            f'cannot save a stitched model without a registered architecture (its pretrained_cfg names {arch!r}): '
            "build it with timm.create_model('snnet_...') so that timm can rebuild it from config.json")
    weights = folder / WEIGHTS_NAME
    merge_lora = merge_lora and stitch_lora_args(model)['stitch_lora_rank'] > 0
    state = merged_lora_state(model) if merge_lora else model.state_dict()
    state = {k: v.detach().contiguous() for k, v in state.items()}
    safetensors.torch.save_file(state, str(weights), metadata={'format': 'pt'})
    # the compat flag changes what the weights compute and the route space which routes the ids name, so both are
    # always recorded; the active route too, so that the reloaded model runs the route saved (config.json's
    # num_features is that route's); the stitching layers' rank (and scale) because the weights' keys depend on it
    model_args.setdefault('final_norm_on_stitched_routes', model.final_norm_on_stitched_routes)
    model_args.setdefault('route_space', model.route_space)
    model_args.setdefault('stitch_id', model.stitch_id)
    model_args.update({'stitch_lora_rank': 0} if merge_lora else stitch_lora_args(model))
    model_args.update(quantization_args(model))  # the quantized modules to build before loading the weights
    save_config_for_hf(model, str(folder / CONFIG_NAME), model_args=model_args)
    if card is None:
        card = _card_for(model, weights)
    else:
        card.check_model(model)
    if merge_lora and card.measured_with and card.measured_with.get('weights_fingerprint') == weights_key(model):
        # the merged weights compute what the model does: its accuracies hold for them
        card.measured_with = {**card.measured_with, 'weights_fingerprint': state_key(state)}
    card.save(folder / CARD_NAME)
    license = (getattr(model, 'pretrained_cfg', None) or {}).get('license') or 'apache-2.0'
    (folder / README_NAME).write_text(render_readme(card, plot_name=None, repo_id=repo_id, license=license),
                                      encoding='utf-8')


def _holds_saved_model(folder: Path) -> bool:
    """Whether ``folder`` holds a saved timm model: a ``config.json`` naming its ``architecture``."""
    try:
        with open(folder / CONFIG_NAME, encoding='utf-8') as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and isinstance(config.get('architecture'), str)


def _card_for(model: StitchedNet, weights: Path) -> RouteCard:
    """The model's counted card, keeping the latency and provenance of the card loaded on it, and its accuracy
    unless that is stale (measured on other weights or model arguments: not published beside these weights)."""
    card = RouteCard.from_model(model, checkpoint=weights)
    if model.card is None:
        return card
    loaded, stale = model.card, staleness(model.card, model)
    if stale:
        _logger.warning(f'the route card loaded on the model is stale ({stale}): its accuracies are not saved')
        loaded = loaded.without_accuracy()
    return card.with_measurements(loaded)




# ---- loading ----------------------------------------------------------------------------------------------------

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
        raise ValueError(f'this is an official SN-Net release checkpoint, not a {arch} checkpoint: convert it first '
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
