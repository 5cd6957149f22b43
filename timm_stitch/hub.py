"""Saving stitched models as Hub-ready folders and publishing them to the Hugging Face Hub (like timm's ``_hub.py``).

A published folder (or Hub repo) holds ``config.json`` (architecture, ``model_args``, ``pretrained_cfg``, written by
timm's own ``save_config_for_hf``), ``model.safetensors``, ``routes.json`` (the route card) and a ``README.md`` model
card rendered from it. ``timm.create_model(arch, pretrained=True)`` and ``timm.create_model('hf-hub:ORG/REPO')`` load
the weights through timm's pretrained machinery and ``routes.json`` from the same place (see
:mod:`timm_stitch.models._loading`), so ``routes()`` carries the card's accuracy without evaluating anything.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import safetensors.torch
from huggingface_hub import HfApi
from timm.models import is_model, save_for_hf
from torch import nn

from ._io import atomic_dir
from ._timm_compat import save_config_for_hf
from .card_readme import is_rendered_readme, render_readme
from .cards import RouteCard
from .catalogue import staleness, state_key, weights_key
from .model import StitchedNet
from .quantization import quantization_args
from .stitching import merged_lora_state, stitch_lora_args
from .unwrap import unwrap

__all__ = [
    'save_pretrained', 'push_to_hub',
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
        if isinstance(model, StitchedNet):
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
