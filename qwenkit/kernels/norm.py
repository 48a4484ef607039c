"""RMSNorm on the CPU kernels (csrc/attention.c): each row alone, in one thread."""

from __future__ import annotations

import torch

from qwenkit.kernels.library import available, check, library


def takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether rms_norm runs here for these tensors: the kernels are built, float32 rows and weight, no autograd."""
    return x.dtype == torch.float32 and weight.dtype == torch.float32 and not torch.is_grad_enabled() \
        and available()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension of float32 x with a float32 weight: x * rsqrt(mean(x^2) + eps) * weight."""
    dim = x.shape[-1]
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or weight.shape != (dim,):
        raise ValueError("rms_norm: float32 rows and a float32 weight of their width")
    x = x.contiguous()
    out = torch.empty_like(x)
    rc = library().qk_rms_norm(x.data_ptr(), x.numel() // dim, dim, weight.contiguous().data_ptr(), eps,
                               out.data_ptr())
    if rc:
        check(rc, "rms_norm")
    return out
