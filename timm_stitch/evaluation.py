"""Evaluation pieces shared by the trainer, the validator and the demo: the stitched model from command-line
arguments, datasets read in the model's image mode, sharded eval loaders, and every route's loss/top-1/top-5 in one
pass over the data."""
from __future__ import annotations

import argparse
import os
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from ._mismatch import WeightsMismatchError, torch_mismatch
from .errors import NoImagesError, RouteIdError

__all__ = ['load_weights', 'parse_ids', 'model_route_ids', 'eval_loader', 'image_mode', 'create_image_dataset',
           'evaluate_routes',
           'create_stitched_model', 'check_data_dir', 'resolve_amp_dtype', 'resolve_device', 'data_config_for',
           'NoImagesError']

#: the Pillow mode images are read in for a model's number of input channels
_IMAGE_MODES = {1: 'L', 3: 'RGB'}


def parse_ids(text: str, num_routes: int, anchor_ids: Optional[Sequence[int]] = None,
              allow_none: bool = False) -> list[int]:
    """Route ids from the one route-list syntax: a comma list of ids (``'0,3,5-9'``), ``'all'`` and, given the
    anchor routes' ``anchor_ids``, ``'anchors'``; ``'none'`` alone gives no ids where ``allow_none``. Raises
    ``ValueError`` on other text or ids outside ``0..num_routes-1``."""
    tokens = [p.strip() for p in text.split(',') if p.strip()]
    if allow_none and tokens == ['none']:
        return []
    ids: list[int] = []
    for part in tokens:
        if part == 'all':
            ids.extend(range(num_routes))
        elif part == 'anchors' and anchor_ids is not None:
            ids.extend(anchor_ids)
        else:
            try:
                lo, _, hi = part.partition('-')
                first, last = int(lo), int(hi or lo)
            except ValueError:
                raise ValueError(f"route ids must look like 'all', 'anchors' or '0,3,5-9', got {text!r}") from None
            if last < first:
                raise RouteIdError(f'route range {part!r} runs backwards: write it low-high, e.g. {last}-{first}')
            ids.extend(range(first, last + 1))
    bad = [i for i in ids if not 0 <= i < num_routes]
    if bad or not ids:
        raise RouteIdError(f'route ids {bad or text!r} are out of range: valid ids are 0..{num_routes - 1}')
    return sorted(set(ids))


def model_route_ids(text: str, model: nn.Module, allow_none: bool = False) -> list[int]:
    """The routes of ``model`` a route list names (:func:`parse_ids`, with ``'anchors'`` its anchor routes)."""
    return parse_ids(text, model.num_routes, [r.id for r in model.plan.routes if r.is_anchor], allow_none)


def eval_loader(
        dataset: torch.utils.data.Dataset,
        data_config: dict[str, Any],
        batch_size: int,
        workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
        indices: Optional[Sequence[int]] = None,
        pin_memory: bool = False,
) -> DataLoader:
    """A loader of eval-transformed (resize, center crop, normalise) images: this rank's share of ``indices``
    (default: all samples), every ``world_size``-th sample, in order and without the padding of timm's samplers."""
    from timm.data import create_transform
    dataset.transform = create_transform(**data_config, is_training=False)
    indices = list(range(len(dataset))) if indices is None else list(indices)
    return DataLoader(Subset(dataset, indices[rank::world_size]), batch_size=batch_size, shuffle=False,
                      num_workers=workers, pin_memory=pin_memory)


def image_mode(in_chans: int, override: Optional[str] = None) -> str:
    """The Pillow mode to read images in for a model with ``in_chans`` input channels ('L' for 1, 'RGB' for 3), or
    ``override`` (timm's ``--input-img-mode``) when it has that many bands; raises ``ValueError`` otherwise."""
    from PIL import Image
    if not override:
        if in_chans not in _IMAGE_MODES:
            raise ValueError(f'no default image mode for a model with {in_chans} input channels (1 reads L, 3 reads '
                             'RGB): pass --input-img-mode')
        return _IMAGE_MODES[in_chans]
    try:
        bands = len(Image.new(override, (1, 1)).getbands())
    except ValueError:
        raise ValueError(f'--input-img-mode {override!r} is not a Pillow image mode (e.g. L, RGB, RGBA)') from None
    if bands != in_chans:
        raise ValueError(f'--input-img-mode {override!r} gives {bands}-channel images, the model takes {in_chans}')
    return override


class _ConvertedDataset(torch.utils.data.Dataset):
    """A torchvision dataset (timm's ``torch/`` names ignore ``input_img_mode``) whose images are converted to
    ``mode`` before ``transform``, which the loaders set on this wrapper."""

    def __init__(self, dataset: torch.utils.data.Dataset, mode: str):
        self.dataset, self.mode, self.transform = dataset, mode, getattr(dataset, 'transform', None)
        dataset.transform = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image, target = self.dataset[index]
        image = image.convert(self.mode)
        return (self.transform(image) if self.transform is not None else image), target


def data_config_for(args: argparse.Namespace, model: nn.Module, verbose: bool = False) -> dict[str, Any]:
    """timm's ``resolve_data_config`` for ``args`` and ``model``, with the model's input channels: timm takes 3
    unless the arguments say otherwise, so ``--img-size 32`` on a 1-channel model would give (3, 32, 32)."""
    from timm.data import resolve_data_config
    options = vars(args)
    if options.get('in_chans') is None and options.get('chans') is None and hasattr(model, 'in_chans'):
        options = {**options, 'in_chans': model.in_chans}
    return resolve_data_config(options, model=model, verbose=verbose)


#: split names timm's torchvision datasets take
TORCH_SPLITS = ('train', 'training', 'test', 'val', 'valid', 'validation', 'eval', 'evaluation')


def create_image_dataset(args: argparse.Namespace, split: str, in_chans: int, **kwargs: Any
                         ) -> torch.utils.data.Dataset:
    """timm's ``create_dataset`` for ``args`` (``--dataset``, ``--data-dir``...) with the images read in the mode the
    model takes (:func:`image_mode`), whatever mode the files are in."""
    from timm.data import create_dataset
    mode = image_mode(in_chans, args.input_img_mode)
    is_torch = args.dataset.lower().startswith('torch/')
    if is_torch and split not in TORCH_SPLITS:  # timm reads any other name as the test split
        raise ValueError(f'split {split!r} is not a split of {args.dataset}: expected one of {", ".join(TORCH_SPLITS)} '
                         "('train'/'training' is the training split, the others its test split)")
    try:
        dataset = create_dataset(args.dataset, root=args.data_dir, split=split, download=args.dataset_download,
                                 class_map=args.class_map, input_img_mode=mode, **kwargs)
    except RuntimeError as e:
        if 'Found 0 images' in str(e):
            raise NoImagesError(f'no images in {args.data_dir!r} (split {split!r}): {e}') from e
        if not (is_torch and 'not found' in str(e)):
            raise
        hint = ''
        if args.dataset.lower() == 'torch/fashion_mnist':
            hint = (' For IDX files in one folder (such as Debian\'s /usr/share/datasets/fashion-mnist), lay them out '
                    'first: python -c "from timm_stitch.data import prepare_fashion_mnist; '
                    'prepare_fashion_mnist(\'DIR\', source=\'IDX_FOLDER\')", then pass --data-dir DIR.')
        raise FileNotFoundError(f'{args.dataset} is not in --data-dir {args.data_dir!r} in torchvision\'s layout '
                                f'(and --dataset-download is off).{hint}') from e
    return _ConvertedDataset(dataset, mode) if is_torch else dataset


@torch.no_grad()
def evaluate_routes(
        model: nn.Module,
        loader: Any,
        route_ids: Sequence[int],
        device: torch.device,
        amp_dtype: Optional[torch.dtype] = None,
        progress: bool = True,
) -> dict[int, dict[str, float]]:
    """Loss, top-1 and top-5 (percent) of each route in ``route_ids`` over ``loader``; every batch runs every
    route. Under ``torch.distributed`` the counts of all ranks are summed, so each rank returns the same values."""
    model.eval()
    sums = torch.zeros(len(route_ids), 3, dtype=torch.float64, device=device)  # loss sum, top1, top5 counts
    count = torch.zeros((), dtype=torch.float64, device=device)
    for images, target in tqdm(loader, desc=f'eval {len(route_ids)} routes', disable=not progress, leave=False):
        images, target = images.to(device), target.to(device)
        for i, k in enumerate(route_ids):
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                output = model(images, stitch_id=k)
            output = output.float()
            top5 = output.topk(min(5, output.shape[-1]), dim=-1).indices
            hits = top5.eq(target[:, None])
            sums[i, 0] += nn.functional.cross_entropy(output, target, reduction='sum')
            sums[i, 1] += hits[:, 0].sum()
            sums[i, 2] += hits.any(dim=-1).sum()
        count += target.shape[0]
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
        dist.all_reduce(count)
    n = max(count.item(), 1.0)
    return {k: {'loss': sums[i, 0].item() / n, 'top1': 100 * sums[i, 1].item() / n,
                'top5': 100 * sums[i, 2].item() / n, 'count': int(count.item())}
            for i, k in enumerate(route_ids)}


def create_stitched_model(args: argparse.Namespace, **kwargs: Any) -> nn.Module:
    """The one model builder of the command line: ``timm.create_model(args.model, ...)`` with the shared model
    options (``--anchors``, ``--route-space``, ``--model-kwargs``, ``--num-classes``, ``--img-size``,
    ``--pretrained``) and ``kwargs``, and a clear error for an unknown name or a non-stitched model."""
    import timm

    from . import models  # noqa: F401  (registers the architectures)
    from .model import StitchedNet
    if ':' not in args.model and not timm.is_model(args.model):
        raise ValueError(f'unknown model {args.model!r}: expected a registered snnet_* architecture '
                         f"(see timm.list_models('snnet*')) or 'snnet' with --anchors")
    model_kwargs = dict(args.model_kwargs or {})
    if (args.anchors or 'anchors' in model_kwargs) and args.model != 'snnet':
        raise ValueError(f'anchors apply to the generic --model snnet only: {args.model} has its own anchors')
    if args.anchors:
        if 'anchors' in model_kwargs:
            raise ValueError('give the anchors either with --anchors or in --model-kwargs, not both')
        model_kwargs['anchors'] = [a.strip() for a in args.anchors.split(',') if a.strip()]
    if args.route_space is not None:
        if 'route_space' in model_kwargs:
            raise ValueError('give the route space either with --route-space or in --model-kwargs, not both')
        model_kwargs['route_space'] = args.route_space
    if args.num_classes is not None:
        model_kwargs['num_classes'] = args.num_classes
    if args.img_size is not None:
        model_kwargs['img_size'] = args.img_size
    model = timm.create_model(args.model, pretrained=args.pretrained, **model_kwargs, **kwargs)
    if not isinstance(model, StitchedNet):
        raise ValueError(f'{args.model} is not a stitched network (expected an snnet_* architecture)')
    return model


def check_data_dir(args: argparse.Namespace) -> None:
    """Raise for a folder dataset without ``--data-dir`` or a ``--data-dir`` that does not exist."""
    if not args.dataset and not args.data_dir:
        raise ValueError('--data-dir is required for a folder dataset')
    if args.data_dir and not os.path.exists(args.data_dir):
        raise FileNotFoundError(f'dataset path {args.data_dir!r} does not exist')


def resolve_amp_dtype(args: argparse.Namespace) -> Optional[torch.dtype]:
    """The autocast dtype of ``--amp``/``--amp-dtype`` (None without ``--amp``); ``--amp-dtype`` alone is an
    error, not a silent no-op."""
    if args.amp_dtype and not args.amp:
        raise ValueError(f'--amp-dtype {args.amp_dtype} needs --amp')
    return getattr(torch, args.amp_dtype or 'float16') if args.amp else None


def resolve_device(name: Optional[str]) -> str:
    """``name``, or the default device: cuda when available, else cpu."""
    return name or ('cuda' if torch.cuda.is_available() else 'cpu')


_WEIGHTS_FORMATS = ('a .safetensors file, or a torch.save checkpoint (.pth/.pt) holding a state dict, plain or '
                    "under 'state_dict'/'model'")


def _first_sentence(error: BaseException) -> str:
    """The first sentence of an error's message (torch's add advice about its own arguments after the first)."""
    text = str(error).strip().strip("'\"") or repr(error)
    return text.splitlines()[0].split('. ')[0]


@contextmanager
def _reading_weights(path: str, model: nn.Module) -> Iterator[None]:
    """Turn the many errors of a weights file that cannot be read into one ``ValueError`` naming the file and the
    formats taken, and weights that do not fit the model into a ``WeightsMismatchError`` that counts what differs."""
    try:
        yield
    except Exception as e:  # torch.load and safetensors raise a dozen types for damaged or foreign files
        mismatch = torch_mismatch(e)
        if mismatch:
            arch = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture') or type(model).__name__
            lora = ("; the low-rank update of its stitching layers differs from the model's: build the model with "
                    "the checkpoint's stitch_lora_rank (e.g. --model-kwargs stitch_lora_rank=64)"
                    ) if 'lora_' in str(e) else ''
            raise WeightsMismatchError(f'{path} holds the weights of another architecture (or of other model '
                                       f'arguments) than {arch}: {mismatch}{lora}') from e
        raise ValueError(f'cannot load the weights file {path}: expected {_WEIGHTS_FORMATS}; '
                         f'{type(e).__name__}: {_first_sentence(e)}') from e


def load_weights(model: nn.Module, path: str, use_ema: bool = False) -> str:
    """Load the weights file ``path`` into ``model`` and return the file read. With ``use_ema``, the EMA weights:
    ``{stem}_ema.safetensors`` beside the trainer's ``{stem}.safetensors``, or the ``state_dict_ema``/``model_ema``
    entry of a ``.pth``; raises ``FileNotFoundError``/``ValueError`` when there are none, rather than loading the
    plain weights."""
    import timm
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint {path!r} does not exist')
    if not use_ema or path.endswith('_ema.safetensors'):
        with _reading_weights(path, model):
            timm.models.load_checkpoint(model, path, use_ema=False)
        return path
    if path.endswith('.safetensors'):
        ema = path.removesuffix('.safetensors') + '_ema.safetensors'
        if not os.path.isfile(ema):
            raise FileNotFoundError(f'--use-ema: {path} has no EMA weights beside it (expected {ema}, which the '
                                    'trainer writes with --model-ema)')
        with _reading_weights(ema, model):
            timm.models.load_checkpoint(model, ema, use_ema=False)
        return ema
    with _reading_weights(path, model):
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    key = next((k for k in ('state_dict_ema', 'model_ema') if isinstance(checkpoint, dict)
                and checkpoint.get(k) is not None), None)
    if key is None:
        raise ValueError(f'--use-ema: {path} holds no EMA weights (no state_dict_ema or model_ema entry)')
    with _reading_weights(path, model):
        model.load_state_dict(timm.models.clean_state_dict(checkpoint[key]))
    return path
