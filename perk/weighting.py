"""Token weighting: a meta-learned weight per context token on the inner NLL.

``w_t = 2·sigmoid(MLP(h_t))`` where ``h_t`` is the frozen base model's last hidden state at token
t (adapters off, no gradient: the features are constants, so the weights depend only on the
context and the MLP's parameters ω). The last layer starts at zero, so every weight starts at 1
and the inner loss starts as the plain mean NLL.
"""

from __future__ import annotations

import torch
from torch import nn


class TokenWeighting(nn.Module):
    """``features (..., d_model) → weights (...)`` in (0, 2), computed in the module's dtype."""

    def __init__(self, d_model: int, hidden: int, *, dtype: torch.dtype, generator: torch.Generator):
        super().__init__()
        self.hidden = nn.Linear(d_model, hidden, dtype=dtype)
        self.out = nn.Linear(hidden, 1, dtype=dtype)
        bound = d_model**-0.5
        with torch.no_grad():
            self.hidden.weight.uniform_(-bound, bound, generator=generator)
            self.hidden.bias.zero_()
            self.out.weight.zero_()
            self.out.bias.zero_()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = features.to(self.out.weight.dtype)
        return 2.0 * torch.sigmoid(self.out(nn.functional.gelu(self.hidden(x))).squeeze(-1))
