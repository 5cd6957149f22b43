"""The timm functions timm-stitch relies on that timm keeps in private modules (``timm.models._builder``,
``timm.models._hub``, ``timm.models._input``, ``timm.models._features``, ``timm.layers._fx``): imported here and
nowhere else, so a timm release that moves one breaks this module alone, with an error naming the function and the
installed timm."""
from __future__ import annotations

import timm

try:
    from timm.layers._fx import get_notrace_functions, get_notrace_modules
    from timm.models._builder import _resolve_pretrained_source as resolve_pretrained_source
    from timm.models._features import feature_take_indices
    from timm.models._hub import download_from_hf, get_cache_dir, save_config_for_hf
    from timm.models._input import update_model_input_size
except ImportError as e:  # pragma: no cover - depends on the installed timm
    raise ImportError(f'timm-stitch needs timm.models._builder._resolve_pretrained_source, timm.models._hub\'s '
                      f'download_from_hf, get_cache_dir and save_config_for_hf, '
                      f'timm.models._input.update_model_input_size, timm.models._features.feature_take_indices and '
                      f'timm.layers._fx\'s get_notrace_functions and get_notrace_modules, '
                      f'which timm {timm.__version__} does not have '
                      f'({e}); install a timm version timm-stitch supports (see its requirements)') from e

__all__ = ['resolve_pretrained_source', 'download_from_hf', 'get_cache_dir', 'save_config_for_hf',
           'update_model_input_size', 'feature_take_indices', 'get_notrace_functions', 'get_notrace_modules']
