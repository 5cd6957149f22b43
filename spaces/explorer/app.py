"""The timm-stitch route explorer as a Hugging Face Space, for any ``snnet_*`` model id.

The model id comes from the first argument (``python app.py snnet_swin_tsb``), else the ``TIMM_STITCH_MODEL``
variable (a Space setting), else ``snnet_vit_fmnist_tsb``, whose weights and card ship inside the package, so the
default runs offline. Its pretrained weights are loaded through timm (``pretrained=True``), with the card they come
with. The page is served on ``GRADIO_SERVER_NAME`` (Spaces set 0.0.0.0), else on 127.0.0.1 only.
"""
from __future__ import annotations

import argparse
import os
from typing import Optional

import timm

import timm_stitch  # noqa: F401  (registers the snnet_* architectures)
from timm_stitch.explorer import build_app, launch

DEFAULT_MODEL = 'snnet_vit_fmnist_tsb'


def create_demo(model_name: Optional[str] = None):
    """The explorer page of ``model_name`` (default: ``$TIMM_STITCH_MODEL``, else the shipped Fashion-MNIST one)."""
    name = model_name or os.environ.get('TIMM_STITCH_MODEL') or DEFAULT_MODEL
    return build_app(timm.create_model(name, pretrained=True).eval())


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('model', nargs='?', default=None, help='an snnet_* model id with pretrained weights')
    args = parser.parse_args()
    port = os.environ.get('GRADIO_SERVER_PORT')
    launch(create_demo(args.model), host=os.environ.get('GRADIO_SERVER_NAME', '127.0.0.1'),
           port=int(port) if port else None)
