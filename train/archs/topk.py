"""TopK (Gao et al. 2024): keep the k largest entries of relu(pre) in each row; FVU-style loss + α·AuxK as
BatchTopK's. Exported as SAELens topk."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sae.errors import SaeError

from .base import Terms, TrainingSae


class TopK(TrainingSae):
    arch = "topk"
    uses_aux = True

    def __init__(self, d_in: int, d_sae: int, *, k: int = 32, **kw: Any):
        super().__init__(d_in, d_sae, **kw)
        if k is None or int(k) != k or not 1 <= k <= d_sae:
            raise SaeError(f"topk needs an integer k in [1, d_sae={d_sae}], got {k!r}")
        self.k = int(k)

    @classmethod
    def options(cls, cfg: Any, point: Any) -> dict[str, Any]:
        return {"k": point.k}

    def select(self, pre: Tensor, n_rows: int) -> tuple[Tensor, Tensor]:
        top = torch.topk(pre, int(self.k), dim=1, sorted=False)
        cols, order = torch.sort(top.indices, dim=1)
        keep = (top.values.gather(1, order) > 0).reshape(-1).nonzero().squeeze(1)  # one host read: the count
        return torch.div(keep, cols.shape[1], rounding_mode="floor"), cols.reshape(-1)[keep]

    def loss(self, t: Terms) -> Tensor:
        return t.recon + self.aux_alpha * t.aux
