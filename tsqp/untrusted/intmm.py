"""The server's side of protected offload: 12-bit weights times masked inputs in Z_2^40, exactly.

`IntCompute` quantizes the server's copy of the public weights (tsqp/quant.py, so both sides hold the
same integers; `fingerprint` is what the server states) and answers a linear request whose input is a
masked ring element in limbs, uint8 [5, T, in], with Z = B W^T mod 2^40, int64 [T, out] (ring.limb_matmul:
one int8 GEMM with int32 accumulation: the five limbs times the weights' two int8 planes). It never sees an unmasked activation. It has
the `Compute` surface that `LocalOffload` drives (cfg, dtype, cuda, run), so
`LocalOffload(IntCompute(cfg, weights))` is an in-process inner for `ProtectedOffload`.
"""
from __future__ import annotations

import time

import torch

from .. import quant, ring
from ..config import ModelConfig


class IntCompute:
    def __init__(self, cfg: ModelConfig, weights: dict[str, torch.Tensor], device: str = "cpu", faults=None):
        """faults: a faults.FaultInjector that alters results (detection tests); None computes honestly."""
        self.cfg, self.device = cfg, torch.device(device)
        self.dtype = torch.uint8                   # the wire dtype of requests
        self.cuda = self.device.type == "cuda"
        qweights = quant.quantize_model(cfg, weights)
        self.fingerprint = quant.fingerprint(qweights)
        self.weights = {key: ring.RingWeight(w.q, self.device) for key, w in qweights.items()}
        self.faults = faults

    def forward(self, op: str, layer: int | None, limbs: torch.Tensor) -> torch.Tensor:
        """uint8 [5, T, in] -> int64 [T, out]; a malformed request raises ValueError naming what is wrong."""
        key = (op, None if op == "lm_head" else layer)
        if key not in self.weights:
            raise ValueError(f"no protected op '{op}' for layer {layer}")
        w = self.weights[key]
        if limbs.dtype != torch.uint8 or limbs.dim() != 3 or limbs.shape[0] != ring.LIMBS \
                or limbs.shape[2] != w.in_features:
            raise ValueError(f"op '{op}' takes uint8 [{ring.LIMBS}, T, {w.in_features}], "
                             f"got {limbs.dtype} {tuple(limbs.shape)}")
        return ring.limb_matmul(limbs.to(self.device), w).cpu()

    def run(self, op: str, layer: int | None, inputs: list[torch.Tensor],
            out: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        """(result, compute seconds), as Compute.run."""
        t0 = time.perf_counter()
        if len(inputs) != 1:
            raise ValueError(f"op '{op}' takes one input, got {len(inputs)}")
        z = self.forward(op, layer, inputs[0])
        if self.faults is not None:
            z = self.faults.apply(op, layer, z)
        if out is not None:
            z = out.copy_(z)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return z, time.perf_counter() - t0
