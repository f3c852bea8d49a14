"""TokenUnify's mixture of token-prediction objectives for a ``next_token`` model.

TokenUnify (Chen et al., 2024) pre-trains one autoregressive model on three
objectives at once, a hierarchy from local to global: *random-token*
prediction (a random share of the tokens hidden, predicted from all the
others), *next-token* prediction (each token from the ones before it) and
*next-all-token* prediction (every token after a cut, all at once, from the
tokens before the cut), which trains the model to see past the next token
and so against the errors that accumulate when it samples.

:func:`mix_objectives` turns a next-token batch (``batch_inputs`` or
``pack_documents`` of a ``next_token`` plan: the input at target ``j`` is
token ``j - 1``, BOS at ``j = 0``) into the mixture. Each *document* of the
batch gets one objective: the counts per batch are the weights' largest-
remainder apportionment of the batch's documents (so each objective's share
is within ``1 / documents`` of its weight), assigned in a random order.

- ``next_token``: the document as it is.
- ``random_token``: MaskGIT's draw (``maskgit.mask_ratio``, cosine): ``ceil(cos(pi r/2) n)`` of the ``n``
  tokens (``r ~ U[0, 1)``, at least one) are hidden: the input that holds each of them (target ``j + 1``'s)
  reads ``MASK``; only they are scored; the document's targets form one group (bidirectional attention).
- ``next_all``: a cut ``c ~ U{0..n-1}``; targets ``c..n-1`` are scored, and the inputs after target ``c``
  (tokens ``c..n-2``) read ``MASK``: causal attention stays, so target ``j >= c`` sees the tokens before the
  cut and nothing after it.

With all the weight on ``next_token`` the batch is returned untouched and the generator is not drawn from:
training is bit for bit plain next-token training. The held-out loss of such a model stays next-token
teacher forcing: the objective is a training device, the model a next-token model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .maskgit import mask_ratio
from .sequence import IGNORE_INDEX, ModelInputs, target_documents
from .vocab import MASK

#: in the order of the paper's hierarchy (local -> global)
OBJECTIVES = ("random_token", "next_token", "next_all")


@dataclass(frozen=True)
class ObjectiveMix:
    """Weights of the three objectives (any non-negative numbers with a positive sum; normalized)."""

    random_token: float = 0.0
    next_token: float = 1.0
    next_all: float = 0.0

    def __post_init__(self) -> None:
        weights = self.weights
        if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"objective weights {dict(zip(OBJECTIVES, weights, strict=True))} must be "
                             "non-negative with a positive sum")

    @property
    def weights(self) -> tuple[float, float, float]:
        return (self.random_token, self.next_token, self.next_all)

    @property
    def plain(self) -> bool:
        """All the weight on next-token prediction: training as without a mixture."""
        return self.random_token == 0 and self.next_all == 0

    def counts(self, n: int) -> tuple[int, ...]:
        """``n`` documents apportioned to the objectives by largest remainder (ties: the paper's order)."""
        total = sum(self.weights)
        quotas = [w / total * n for w in self.weights]
        counts = [math.floor(q) for q in quotas]
        by_remainder = sorted(range(len(quotas)), key=lambda k: (-(quotas[k] - counts[k]), k))
        for k in by_remainder[:n - sum(counts)]:
            counts[k] += 1
        return tuple(counts)


def mix_objectives(inputs: ModelInputs, mix: ObjectiveMix, generator: torch.Generator) -> ModelInputs:
    """The batch with each document under its objective (module docstring); ``generator`` on the CPU."""
    if mix.plain:
        return inputs
    input_ids, target_ids = inputs.input_ids.clone(), inputs.target_ids.clone()
    group_ids = inputs.group_ids.clone()
    documents = target_documents(inputs)
    kinds = [kind for kind, count in zip(OBJECTIVES, mix.counts(len(documents)), strict=True)
             for _ in range(count)]
    order = torch.randperm(len(documents), generator=generator).tolist()
    for (b, pos), k in zip(documents, order, strict=True):
        kind, n = kinds[k], len(pos)
        if kind == "random_token":
            r = float(torch.rand((), generator=generator, dtype=torch.float64))
            hidden = torch.randperm(n, generator=generator)[:min(n, max(1, math.ceil(mask_ratio(r) * n)))]
            shown = torch.ones(n, dtype=torch.bool)
            shown[hidden] = False
            holders = hidden[hidden < n - 1] + 1          # the input of target j + 1 holds token j
            input_ids[b, pos[holders.to(pos.device)]] = MASK
            target_ids[b, pos[shown.to(pos.device)]] = IGNORE_INDEX
            group_ids[b, pos] = int(group_ids[b, pos[0]])
        elif kind == "next_all":
            cut = int(torch.randint(0, n, (), generator=generator))
            input_ids[b, pos[cut + 1:]] = MASK
            target_ids[b, pos[:cut]] = IGNORE_INDEX
    return replace(inputs, input_ids=input_ids, target_ids=target_ids, group_ids=group_ids)
