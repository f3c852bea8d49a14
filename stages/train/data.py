"""From token stores to model inputs: one vocabulary over all stores, plans per token layout, rows per step.

A *document* is one sample laid out as ``[modality tag, class, caption tokens] + targets`` (see
``stages.models.sequence``; the caption positions exist when a store was tokenized with a
``text_tokenizer``); a *row* holds one document padded to ``seq_len``
or, with packing, several documents with document ids so attention never
crosses them. The sampler deals rows (not samples) to ranks, so a step
consumes one contiguous run of the global order whatever the world size, and
its ``state_dict`` after a step is the exact data position of a checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from arpipe.pipeline.errors import UserError

#: ``group_by_length`` rows are padded to a multiple of this (Hugging Face's ``pad_to_multiple_of``): a few
#: row widths, not one per length, so a compiled attention kernel (flex_attention on CUDA) is built a few times
PAD_TO_MULTIPLE_OF = 8


@dataclass
class StoreSummary:
    """What the trainer needs to know about one store, read from its manifest and index."""

    uri: str
    modality: str
    vocab_size: int
    layout: dict[str, Any]
    tokenizer_digest: str | None
    tokenizer_uri: str | None
    samples: int
    max_tokens: int
    labels: list[str]
    text_tokenizer: dict[str, Any] | None = None   # the manifest's text_tokenizer: id, digest, uri, vocab_size
    caption_tokens: int = 0                         # the longest caption, in text tokens
    control: dict[str, Any] | None = None          # the manifest's control: transform, sigma, digest, uri, ...
    control_tokens: int = 0                         # tokens of a control map

    @property
    def variable_length(self) -> bool:
        return not (self.layout.get("scales") or self.layout.get("grid"))


def summarize_store(uri: str) -> StoreSummary:
    from arpipe.stages.store import TokenStore

    store = TokenStore.open(uri)
    meta = store.manifest.metadata or {}
    labels = sorted({str(c) for c in store.conditions(np.arange(len(store))) if c is not None})
    return StoreSummary(
        uri=uri, modality=str(meta.get("modality", "tokens")), vocab_size=store.manifest.vocab.vocab_size,
        layout=dict(meta.get("tokenizer_layout") or {}),
        tokenizer_digest=store.manifest.tokenizer.digest if store.manifest.tokenizer else None,
        tokenizer_uri=meta.get("tokenizer_uri"), samples=len(store), max_tokens=int(store.lengths().max()),
        labels=labels, text_tokenizer=meta.get("text_tokenizer"),
        caption_tokens=int(store.condition_lengths("caption_tokens").max()) if meta.get("text_tokenizer") else 0,
        control=meta.get("control"),
        control_tokens=int(store.condition_lengths("control_tokens").max()) if meta.get("control") else 0)


def modality_names(summaries: list[StoreSummary]) -> list[str]:
    """One vocabulary range per tokenizer: stores sharing a tokenizer share codes; others get their own."""
    names: list[str] = []
    seen: dict[tuple[str, str | None], str] = {}
    for s in summaries:
        key = (s.modality, s.tokenizer_digest)
        if key not in seen:
            taken = sum(1 for k in seen if k[0] == s.modality)
            seen[key] = s.modality if taken == 0 else f"{s.modality}{taken + 1}"
        names.append(seen[key])
    return names


def text_tokenizer(summaries: list[StoreSummary]) -> dict[str, Any] | None:
    """The text tokenizer of the stores' captions (one for all of them), or None when no store has captions."""
    return _one_condition(summaries, "text_tokenizer", "captions", "text_tokenizer")


def control_tokenizer(summaries: list[StoreSummary]) -> dict[str, Any] | None:
    """The stores' control maps (one transform and tokenizer for all of them), or None when none has them."""
    return _one_condition(summaries, "control", "control maps", "control (transform and tokenizer)")


def _one_condition(summaries: list[StoreSummary], field: str, what: str, setting: str) -> dict[str, Any] | None:
    found = {json_key(getattr(s, field)): s for s in summaries if getattr(s, field)}
    if len(found) > 1:
        a, b = list(found.values())[:2]
        raise UserError(f"the stores' {what} were made differently ({a.uri} and {b.uri}); one model has one "
                        f"vocabulary for them", where=b.uri, fix=f"tokenize every store with the same {setting}")
    return getattr(next(iter(found.values())), field) if found else None


def json_key(meta: dict[str, Any]) -> str:
    """What makes two stores' condition streams the same: the tokenizer's digest and, for controls, the transform."""
    return f"{meta.get('digest')}/{meta.get('transform')}/{meta.get('sigma')}"


def build_vocab(summaries: list[StoreSummary], heldout: StoreSummary | None = None):
    """One vocabulary over the stores' codes, their classes and, when they have captions or control maps, a
    text and a control prompt stream as long as the longest caption and control (the held-out store's too)."""
    from arpipe.stages.models import VocabLayout

    names = modality_names(summaries)
    sizes: dict[str, int] = {}
    for name, s in zip(names, summaries):
        sizes[name] = max(sizes.get(name, 0), s.vocab_size)
    classes = sorted({label for s in summaries for label in s.labels})
    every = [*summaries, *([heldout] if heldout else [])]
    text, control = text_tokenizer(summaries), control_tokenizer(summaries)
    prompts = [("text", int(text["vocab_size"]), max(1, max(s.caption_tokens for s in every)))] if text else []
    if control:
        prompts.append(("control", int(control["vocab_size"]), max(1, max(s.control_tokens for s in every))))
    return VocabLayout.build(list(sizes.items()), classes=classes, prompts=prompts), names


def scale_inputs(summaries: list[StoreSummary], names: list[str], vocab) -> dict[str, Any]:
    """VAR's next-scale input per vocabulary name: each multi-scale tokenizer's codebook and input mix,
    zero-padded to one width (``ScaleInput``); read from the tokenizer artifacts the stores name."""
    from arpipe.stages.modalities import load_tokenizer
    from arpipe.stages.models import ScaleInput

    found: dict[str, Any] = {}
    for name, s in zip(names, summaries):
        if name in found or not s.layout.get("scales"):   # other layouts: Documents says what fits
            continue
        if not s.tokenizer_uri:
            raise UserError(f"store {s.uri} names no tokenizer artifact, so VAR's accumulated next-scale input "
                            "cannot be built", where=s.uri, fix="tokenize the store with an msvq tokenizer artifact")
        tok = load_tokenizer(s.tokenizer_uri)
        if not hasattr(tok, "next_scale_input_mix"):
            raise UserError(f"a {tok.type} tokenizer has no multi-scale codebook for VAR's accumulated input",
                            where=s.tokenizer_uri, fix="next_scale needs an msvq tokenizer")
        found[name] = ScaleInput(tok.codebook_KD.float(), tok.next_scale_input_mix(), vocab.code_range(name)[0])
    width = max((si.feature_dim for si in found.values()), default=0)
    return {name: si.padded(width) for name, si in found.items()}


def default_seq_len(summaries: list[StoreSummary], vocab) -> int:
    """The longest document; for a store of several image sizes (flexvq), that of its tokenizer's largest size,
    so the model can draw sizes larger than the store's."""
    return vocab.context_len + max(max([s.max_tokens, *s.layout.get("lengths", [])]) for s in summaries)


class Documents:
    """Turns sample ids of a store (or mixture) into model inputs for one paradigm."""

    def __init__(self, source: Any, summaries: list[StoreSummary], names: list[str], vocab, *, paradigm: str,
                 block_size: int, n_axes: int, seq_len: int, scale_inputs: dict[str, Any] | None = None,
                 group_by_length: bool = False):
        from arpipe.stages.models import OctreePlan, make_plan, octree_depth, plan_from_layout

        self.source, self.summaries, self.names, self.vocab = source, summaries, names, vocab
        self.paradigm, self.block_size, self.n_axes, self.seq_len = paradigm, block_size, n_axes, seq_len
        self.group_by_length = group_by_length
        self._make_plan = make_plan
        self.plans: list[Any] = []   # per store: its Plan, an OctreePlan (next_level), None (by length)
        for name, s in zip(names, summaries):
            if paradigm == "next_level":   # a plan per tree, from its own levels (models/levels.py)
                depth = octree_depth(s.layout)
                if depth is None:
                    raise UserError(f"paradigm next_level predicts octree tokens level by level; store {s.uri} "
                                    f"holds {s.modality} tokens laid out on axes {s.layout.get('axes')}",
                                    where=s.uri, fix="tokenize point clouds with `tokenizer: {type: octree}`, or "
                                                     "use paradigm next_token for this store")
                self.plans.append(OctreePlan(depth=depth, n_tokens=s.max_tokens, n_axes=n_axes))
                continue
            if s.variable_length:
                if paradigm in ("next_scale", "masked"):
                    raise UserError(f"paradigm {paradigm} needs a fixed token layout (a grid or scales); store "
                                    f"{s.uri} ({s.modality}) has variable-length tokens", where=s.uri,
                                    fix="use paradigm next_token or next_block for this store")
                self.plans.append(None)
                continue
            try:
                plan = plan_from_layout(paradigm, s.layout, block_size=block_size, n_axes=n_axes)
                self.plans.append(plan.with_scale_input((scale_inputs or {}).get(name)))
            except ValueError as err:
                raise UserError(f"cannot lay out {s.modality} tokens for {paradigm}: {err}", where=s.uri,
                                fix="pick a paradigm that fits the tokenizer (next_scale needs msvq)") from None
        self._variable: dict[int, Any] = {}
        self._prefixes: dict[tuple[int, int], Any] = {}   # (store, n_tokens) -> the prefix of its plan

    def _where(self, i: int) -> tuple[int, int]:
        if hasattr(self.source, "store_of"):
            return self.source.store_of(int(i))
        return 0, int(i)

    def plan(self, store: int, tokens):
        """The plan of one document of ``store`` (``tokens``: its local codes)."""
        plan, n_tokens = self.plans[store], int(tokens.numel())
        if self.paradigm == "next_level":
            return plan.plan_of(tokens)
        if plan is not None and plan.n_tokens != n_tokens and self.summaries[store].layout.get("sizes"):
            # flexvq: a smaller size's tokens are the first scales
            if (store, n_tokens) not in self._prefixes:
                try:
                    self._prefixes[store, n_tokens] = plan.prefix(n_tokens)
                except ValueError as err:
                    raise UserError(f"a sample of {n_tokens} tokens does not fit the store's layout: {err}",
                                    where=self.summaries[store].uri,
                                    fix="tokenize the store again with its tokenizer") from None
            return self._prefixes[store, n_tokens]
        if plan is None:
            if n_tokens not in self._variable:
                self._variable[n_tokens] = self._make_plan(self.paradigm, n_tokens=n_tokens,
                                                           block_size=self.block_size if self.paradigm ==
                                                           "next_block" else 1, n_axes=self.n_axes)
            plan = self._variable[n_tokens]
        return plan

    def document(self, i: int):
        import torch

        k, _local = self._where(i)
        sample = self.source[int(i)]
        tokens = torch.from_numpy(np.asarray(sample.tokens).reshape(-1).astype(np.int64))
        targets = self.vocab.to_global(self.names[k], tokens)
        context = torch.tensor(self.vocab.context_of(self.names[k], sample), dtype=torch.long)
        return self.plan(k, tokens), targets, context

    def lengths(self) -> np.ndarray:
        """Positions each sample occupies (context + tokens), for packing."""
        return np.asarray(self.source.lengths(), dtype=np.int64) + self.vocab.context_len

    def rows(self, units: list) -> Any:
        """Model inputs for a micro-batch of units (a sample id, or a list of ids with packing).

        With ``group_by_length`` the rows are as long as the micro-batch's longest one (rounded up to a
        multiple of ``PAD_TO_MULTIPLE_OF``), not ``seq_len``: the positions cut off are padding, which no
        document attends to and no loss counts.
        """
        from arpipe.stages.models import pack_documents

        rows = [[self.document(i) for i in (u if isinstance(u, list) else [u])] for u in units]
        if not self.group_by_length:
            return pack_documents(rows, self.seq_len)
        longest = max(sum(context.numel() + targets.numel() for _plan, targets, context in docs) for docs in rows)
        width = -(-longest // PAD_TO_MULTIPLE_OF) * PAD_TO_MULTIPLE_OF
        return pack_documents(rows, min(width, self.seq_len))   # a document over seq_len is still refused


def open_source(uris: list[str], weights: list[float]):
    """A store, or a weighted mixture of stores, for the sampler."""
    from arpipe.stages.store import StoreMixture, TokenStore

    stores = [TokenStore.open(u) for u in uris]
    if len(stores) == 1:
        return stores[0]
    return StoreMixture(stores, weights)
