"""The front of a decoder layer in one call on the CPU kernels (csrc/layer.c): its input norm, q/k/v projection,
attention over the paged KV pool, output projection and residual, post-attention norm and gate/up projection."""

from __future__ import annotations

import ctypes

import torch

from qwenkit.kernels.library import Part, check, library

_i64, _f32, _p = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p


class LayerArgs(ctypes.Structure):
    """What stays the same from step to step (csrc/layer.c qk_layer)."""

    _fields_ = [("hidden", _i64), ("heads", _i64), ("kv_heads", _i64), ("head_dim", _i64), ("inter2", _i64),
                ("qkv", ctypes.POINTER(Part)), ("o", ctypes.POINTER(Part)), ("gate_up", ctypes.POINTER(Part)),
                ("n_qkv", _i64), ("n_o", _i64), ("n_gate_up", _i64), ("qkv_bias", _p), ("o_bias", _p),
                ("input_norm", _p), ("post_norm", _p), ("q_norm", _p), ("k_norm", _p),
                ("eps", _f32), ("qk_eps", _f32), ("scale", _f32), ("window", _i64),
                ("k_pool", _p), ("v_pool", _p), ("half", _i64), ("n_blocks", _i64), ("block_shift", _i64)]


class StepArgs(ctypes.Structure):
    """What changes every step (csrc/layer.c qk_step): the rows, their rotary tables and their pool slots."""

    _fields_ = [("rows", _i64), ("cos", _p), ("sin", _p), ("write_slot", _p), ("ctx", _p), ("row_ctx", _p),
                ("row_len", _p)]


def layer_front(layer: LayerArgs, step: StepArgs, x: torch.Tensor, gate_up: torch.Tensor) -> None:
    """x [rows, hidden] float32 contiguous, updated in place to x + attention; gate_up [rows, inter2] float32
    contiguous receives the MLP's gate/up projection of the post-attention norm."""
    rc = library().qk_layer_front(ctypes.addressof(layer), ctypes.addressof(step), x.data_ptr(), gate_up.data_ptr(),
                                  torch.get_num_threads())
    if rc:
        check(rc, "decoder layer")
