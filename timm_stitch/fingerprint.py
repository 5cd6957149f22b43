"""A fingerprint of a network's weights: what derived records (route cards, validation results) are keyed to.

File hashes do not serve: safetensors writes its header metadata in no fixed order, so two saves of the same
tensors differ byte for byte. The fingerprint hashes each tensor's name, dtype, shape and bytes in name order.
"""
from __future__ import annotations

import hashlib
from typing import Mapping, Union

import torch
from torch import nn

__all__ = ['weights_fingerprint']


def weights_fingerprint(weights: Union[nn.Module, Mapping[str, torch.Tensor]], length: int = 16) -> str:
    """Hex digest (``length`` characters) of ``weights`` (a module's ``state_dict`` or a mapping of tensors): equal
    for equal tensors under equal names, whatever the device or the order they were saved in."""
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach()
        digest.update(f'{name}|{tensor.dtype}|{tuple(tensor.shape)}|'.encode())
        digest.update(tensor.cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:length]
