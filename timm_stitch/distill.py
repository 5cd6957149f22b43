"""Knowledge distillation from a timm teacher for SN-Net training (the official recipes use hard distillation)."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ['DistillationLoss', 'KD_TYPES']

KD_TYPES = ('hard', 'soft')


class DistillationLoss(nn.Module):
    """``(1 - alpha) * base(output, target) + alpha * distill``, the distill term on the teacher's output for the
    same (augmented, mixed) images: ``hard`` is cross-entropy to the teacher's argmax, ``soft`` the KL divergence
    at temperature ``tau`` (scaled by ``tau**2``), as in DeiT."""

    def __init__(self, base: nn.Module, teacher: nn.Module, kind: Literal['hard', 'soft'] = 'hard',
                 alpha: float = 0.5, tau: float = 1.0):
        super().__init__()
        if kind not in KD_TYPES:
            raise ValueError(f'distillation type must be one of {KD_TYPES}, got {kind!r}')
        if not 0 <= alpha <= 1:
            raise ValueError(f'distillation alpha must be in [0, 1], got {alpha}')
        if tau <= 0:
            raise ValueError(f'distillation tau must be > 0, got {tau}')
        self.base, self.kind, self.alpha, self.tau = base, kind, alpha, tau
        self.teacher = teacher.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> DistillationLoss:
        super().train(mode)
        self.teacher.eval()  # the teacher stays in eval mode
        return self

    def forward(self, images: torch.Tensor, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        base = self.base(output, target)
        with torch.no_grad():
            teacher = self.teacher(images)
        if self.kind == 'hard':
            distill = F.cross_entropy(output, teacher.argmax(dim=-1))
        else:
            t = self.tau
            distill = F.kl_div(F.log_softmax(output / t, dim=-1), F.log_softmax(teacher / t, dim=-1),
                               reduction='batchmean', log_target=True) * t * t
        return (1 - self.alpha) * base + self.alpha * distill
