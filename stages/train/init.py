"""Starting from trained weights (``init_from``) and keeping some fixed (``freeze``).

The starting model's shape must be the new one's (width, depth, heads, paradigm, block size, next-scale input
width): :func:`shape_problem` says which field differs, at plan time. Its vocabulary is kept and may grow:
:func:`grow_vocab` lays out the new vocabulary as the old one (every modality, class and prompt stream, so
the fine-tuned model still draws what it drew) plus what the new stores add, and pairs each old id with its
new id. A store whose tokenizer made one of the old ranges trains in that range; another tokenizer gets a
new range. On the workers, :func:`apply_initial_weights` copies every tensor, the vocabulary-sized ones
(``tok_emb``, ``head``) row by row along that pairing; new rows keep the fresh model's initialisation.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

from arpipe.pipeline.errors import UserError

#: fields of the model config that must be equal to start from a model (the vocabulary may grow)
SHAPE_FIELDS = ("n_embd", "n_layer", "n_head", "mlp_hidden", "multiple_of", "paradigm", "block_size", "rope_axes",
                "tie_embeddings", "feature_dim")
#: parameters with one row per vocabulary id
VOCAB_PARAMS = ("tok_emb.weight", "head.weight")


@dataclass(frozen=True)
class InitialWeights:
    """What a worker needs to start from a trained model: where its folder is and how its ids map."""

    location: str                          # the model folder (local path or s3://), fetched on the worker
    pairs: tuple[tuple[int, int], ...]     # (old id, new id) of every kept vocabulary row
    digest: str                            # of the starting weights, as their config.json records it


def shape_problem(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """The first shape field that differs between two models' arguments, as a sentence (None: they match)."""
    for name in SHAPE_FIELDS:
        if name in new and old.get(name) != new.get(name):
            return f"its {name} is {old.get(name)!r}, this stage's model has {new.get(name)!r}"
    return None


def grow_vocab(old_vocab, old_tokenizers: dict[str, dict[str, Any]], summaries: list, heldout=None):
    """``(vocab, names, kept, pairs)``: the old vocabulary grown by the stores' ranges, classes and prompt
    streams; each store's range name; the old tokenizers.json entries of ranges no store trains (kept in the
    new model's); and (old id, new id) of every old id."""
    from arpipe.stages.models import VocabLayout
    from arpipe.stages.train.data import build_vocab

    fresh, fresh_names = build_vocab(summaries, heldout)
    by_digest = {info.get("tokenizer_digest"): name for name, info in old_tokenizers.items() if not info.get("prompt")}
    old_sizes = dict(old_vocab.modalities)
    names, added = [], {}
    for name, s in zip(fresh_names, summaries):
        if s.tokenizer_digest in by_digest:
            names.append(by_digest[s.tokenizer_digest])
            continue
        if name not in added:
            base, k = s.modality, 1
            while (new := base if k == 1 else f"{base}{k}") in old_sizes or new in added.values():
                k += 1
            added[name] = new
        names.append(added[name])
    sizes = dict(old_vocab.modalities)
    for fresh_name, new in added.items():
        sizes[new] = dict(fresh.modalities)[fresh_name]
    classes = list(old_vocab.classes) + [c for c in fresh.classes if c not in old_vocab.classes]
    prompts = {n: (size, length) for n, size, length in old_vocab.prompts}
    for n, size, length in fresh.prompts:
        old = old_tokenizers.get(n, {})
        if n in prompts and (prompts[n][0] != size or old.get("tokenizer_digest") not in (None, _digest(summaries, n))):
            raise UserError(f"the stores' {n} tokens were made by another tokenizer than the starting model's",
                            where=summaries[0].uri, fix=f"tokenize the new data with the model's {n} tokenizer")
        prompts[n] = (size, max(length, prompts.get(n, (0, 0))[1]))
    vocab = VocabLayout.build(list(sizes.items()), classes=classes,
                              prompts=[(n, size, length) for n, (size, length) in prompts.items()])
    pairs = [(i, i) for i in range(old_vocab.tags_start)]
    for name, _size in old_vocab.modalities:
        pairs.append((old_vocab.tag(name), vocab.tag(name)))
        (a, b), (c, _d) = old_vocab.code_range(name), vocab.code_range(name)
        pairs += [(a + k, c + k) for k in range(b - a)]
    for label in old_vocab.classes:
        pairs.append((old_vocab.class_token(label), vocab.class_token(label)))
    for n, _size, _length in old_vocab.prompts:
        (a, b), (c, _d) = old_vocab.prompt_range(n), vocab.prompt_range(n)
        pairs += [(a + k, c + k) for k in range(b - a)]
    trained = set(names)
    kept = {n: info for n, info in old_tokenizers.items() if n not in trained and not info.get("prompt")}
    return vocab, names, kept, sorted(pairs)


def _digest(summaries: list, stream: str) -> str | None:
    field = "text_tokenizer" if stream == "text" else "control"
    return next(((getattr(s, field) or {}).get("digest") for s in summaries if getattr(s, field)), None)


def new_rows(vocab, pairs: list[tuple[int, int]]) -> list[str]:
    """The new vocabulary's ranges that start fresh, e.g. ``image2 codes 278-789 (512 rows)``."""
    kept = {new for _old, new in pairs}
    out = []
    spans = [(f"{n} tag", vocab.tag(n), vocab.tag(n) + 1) for n, _s in vocab.modalities]
    spans += [(f"class {c}", vocab.class_token(c), vocab.class_token(c) + 1) for c in vocab.classes]
    spans += [(f"{n} codes", *vocab.code_range(n)) for n, _s in vocab.modalities]
    spans += [(f"{n} prompt tokens", *vocab.prompt_range(n)) for n, _s, _k in vocab.prompts]
    for what, lo, hi in spans:
        fresh = [i for i in range(lo, hi) if i not in kept]
        if fresh:
            out.append(f"{what} {fresh[0]}-{fresh[-1]} ({len(fresh)} rows)" if len(fresh) > 1 else
                       f"{what} {fresh[0]}")
    return out


def apply_initial_weights(model, init: InitialWeights) -> None:
    """Copy the starting model's weights into ``model`` (freshly initialised, new shape), vocabulary rows
    along ``init.pairs``; every other tensor must have the same shape."""
    import torch
    from safetensors.torch import load_file

    from arpipe.stages.models.folder import fetch_model
    from arpipe.stages.models.io import WEIGHTS_FILE

    state = load_file(str(fetch_model(init.location, digests=False) / WEIGHTS_FILE))
    if model.config.tie_embeddings and "head.weight" not in state:
        state["head.weight"] = state["tok_emb.weight"]
    old_ids = torch.tensor([a for a, _b in init.pairs])
    new_ids = torch.tensor([b for _a, b in init.pairs])
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name not in state:
                raise ValueError(f"the starting model has no {name}")
            if name in VOCAB_PARAMS:
                tensor[new_ids] = state[name][old_ids].to(tensor.dtype)
            else:
                tensor.copy_(state[name])


def freeze(model, patterns: list[str] | tuple[str, ...]) -> list[str]:
    """Turn off gradients of the parameters whose names match a pattern; returns their names."""
    frozen = [name for name, p in model.named_parameters() if any(fnmatch.fnmatchcase(name, pat) for pat in patterns)]
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
    return frozen
