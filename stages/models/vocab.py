"""One vocabulary for several modalities: special tokens, modality tags, class tokens, code ranges.

Layout (global ids, in this order)::

    PAD=0  BOS=1  EOS=2  NULL=3 | one tag per modality | one token per class | codes of modality 1 | ...
    | codes of prompt stream 1 (e.g. text) | ...

The store keeps tokenizer-local code ids; ``to_global``/``to_local`` move them
in and out of the model's id space, so one model trains on several stores.
A document's context is ``[tag(modality), class token]`` followed, when the
vocabulary has *prompt streams* (``prompts``: a caption's text tokens, as in
Lumina-mGPT and Chameleon, one vocabulary over text and visual tokens), by a
fixed number of positions per stream: the stream's tokens, then ``NULL`` to
its length. Classifier-free guidance swaps every class and prompt token for
``NULL`` (``drop_conditions`` in training, ``unconditional`` in sampling), so
the unconditional branch is a learned all-``NULL`` condition. ``BOS`` is the
input of the first predicted group.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

PAD, BOS, EOS, NULL = 0, 1, 2, 3
N_SPECIAL = 4
#: MaskGIT's ``[MASK]`` input of the ``masked`` paradigm. It is ``BOS``'s id: a masked model never reads ``BOS``
#: (every position's input is its own token or the mask), so the one embedding means "not known here" in both.
MASK = BOS
VOCAB_FORMAT = 1


@dataclass(frozen=True)
class VocabLayout:
    """Maps (modality, local id) <-> global id; JSON-serializable.

    ``modalities`` are ``(name, codebook size)`` pairs in id order;
    ``classes`` are condition labels as strings (an int label ``3`` is ``"3"``);
    ``prompts`` are ``(name, vocabulary size, positions)`` of the prompt streams
    every context carries (``("text", 320, 12)``: captions of up to 12 tokens).
    """

    modalities: tuple[tuple[str, int], ...]
    classes: tuple[str, ...] = ()
    prompts: tuple[tuple[str, int, int], ...] = ()
    _starts: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        mods = tuple((str(n), int(s)) for n, s in self.modalities)
        object.__setattr__(self, "modalities", mods)
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        object.__setattr__(self, "prompts", tuple((str(n), int(s), int(k)) for n, s, k in self.prompts))
        for name, size, length in self.prompts:
            if size < 1 or length < 1:
                raise ValueError(f"prompt stream {name!r} needs a vocabulary and positions >= 1, got {size} "
                                 f"and {length}")
        if len({n for n, _s, _k in self.prompts}) != len(self.prompts):
            raise ValueError(f"prompt stream names repeat: {[n for n, _s, _k in self.prompts]}")
        names = [n for n, _ in mods]
        if not mods:
            raise ValueError("a vocabulary needs at least one modality, e.g. VocabLayout.build({'image': 512})")
        if len(set(names)) != len(names):
            raise ValueError(f"modality names repeat: {names}")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"class labels repeat: {list(self.classes)}")
        for name, size in mods:
            if size < 1:
                raise ValueError(f"modality {name!r} has codebook size {size}; it must be >= 1")
        starts, at = {}, self.codes_start
        for name, size in mods:
            starts[name] = at
            at += size
        for name, size, _length in self.prompts:
            starts[f"prompt:{name}"] = at
            at += size
        object.__setattr__(self, "_starts", starts)

    @classmethod
    def build(cls, modalities: dict[str, int] | Sequence[tuple[str, int]],
              classes: Iterable[Any] = (), prompts: Sequence[tuple[str, int, int]] = ()) -> VocabLayout:
        """``VocabLayout.build({"image": 512, "volume": 1024}, classes=range(10), prompts=[("text", 320, 12)])``."""
        items = modalities.items() if isinstance(modalities, dict) else modalities
        return cls(tuple(items), tuple(str(c) for c in classes), tuple(prompts))

    # ------------------------------------------------------------ ids

    @property
    def tags_start(self) -> int:
        return N_SPECIAL

    @property
    def classes_start(self) -> int:
        return N_SPECIAL + len(self.modalities)

    @property
    def codes_start(self) -> int:
        return self.classes_start + len(self.classes)

    @property
    def vocab_size(self) -> int:
        return self.codes_start + sum(s for _, s in self.modalities) + sum(s for _, s, _k in self.prompts)

    @property
    def context_len(self) -> int:
        """Positions of every document's context: tag, class, then each prompt stream's positions."""
        return 2 + sum(k for _, _s, k in self.prompts)

    def prompt_range(self, name: str) -> tuple[int, int]:
        """``[start, stop)`` of prompt stream ``name``'s ids (e.g. the text tokenizer's)."""
        sizes = {n: s for n, s, _k in self.prompts}
        if name not in sizes:
            raise ValueError(f"the vocabulary has no prompt stream {name!r} "
                             f"({', '.join(sizes) or 'none: the model was trained without prompts'})")
        start = self._starts[f"prompt:{name}"]
        return start, start + sizes[name]

    def prompt_ids(self, name: str, local: Sequence[int]) -> list[int]:
        """Global ids of a prompt's tokens, checked against the stream's size and positions."""
        start, stop = self.prompt_range(name)
        length = {n: k for n, _s, k in self.prompts}[name]
        ids = [int(t) for t in local]
        if len(ids) > length:
            raise ValueError(f"a {name} prompt of {len(ids)} tokens is longer than the {length} positions the "
                             "model was trained with; shorten it")
        if ids and (min(ids) < 0 or max(ids) >= stop - start):
            raise ValueError(f"{name} token ids must lie in [0, {stop - start}), got [{min(ids)}, {max(ids)}]")
        return [start + t for t in ids]

    @property
    def class_range(self) -> tuple[int, int]:
        return self.classes_start, self.codes_start

    def _modality(self, modality: str) -> int:
        try:
            return self._starts[modality]
        except KeyError:
            raise ValueError(f"modality {modality!r} is not in this vocabulary "
                             f"({', '.join(self._starts)})") from None

    def code_range(self, modality: str) -> tuple[int, int]:
        """``[start, stop)`` of the modality's codes: what sampling may emit for it."""
        start = self._modality(modality)
        return start, start + dict(self.modalities)[modality]

    def tag(self, modality: str) -> int:
        self._modality(modality)
        return self.tags_start + [n for n, _ in self.modalities].index(modality)

    def class_token(self, label: Any) -> int:
        """The token of ``label``; ``None`` gives ``NULL`` (the unconditional token)."""
        if label is None:
            return NULL
        try:
            return self.classes_start + self.classes.index(str(label))
        except ValueError:
            raise ValueError(f"label {label!r} is not a class of this vocabulary "
                             f"({len(self.classes)} classes: {list(self.classes)[:8]}...)") from None

    def to_global(self, modality: str, local: torch.Tensor) -> torch.Tensor:
        start, stop = self.code_range(modality)
        if local.numel() and (int(local.min()) < 0 or int(local.max()) >= stop - start):
            raise ValueError(f"{modality} codes must lie in [0, {stop - start}), got "
                             f"[{int(local.min())}, {int(local.max())}]")
        return local.long() + start

    def to_local(self, modality: str, global_ids: torch.Tensor) -> torch.Tensor:
        start, stop = self.code_range(modality)
        if global_ids.numel() and (int(global_ids.min()) < start or int(global_ids.max()) >= stop):
            raise ValueError(f"ids outside the {modality} range [{start}, {stop})")
        return global_ids.long() - start

    def modality_of(self, global_id: int) -> str | None:
        """The modality whose codes hold ``global_id``; ``None`` for special, tag and class tokens."""
        for name, size in self.modalities:
            if self._starts[name] <= global_id < self._starts[name] + size:
                return name
        return None

    # ------------------------------------------------------------ contexts

    def context(self, modality: str, label: Any = None, prompts: dict[str, Sequence[int]] | None = None) -> list[int]:
        """The tokens a document starts with: ``[tag, class or NULL]``, then each prompt stream's local
        ids (``prompts``, e.g. ``{"text": caption_tokens}``) padded with ``NULL`` to its positions; a stream
        without a prompt is all ``NULL``."""
        out = [self.tag(modality), self.class_token(label)]
        unknown = set(prompts or {}) - {n for n, _s, _k in self.prompts}
        if unknown:
            self.prompt_range(sorted(unknown)[0])   # raises, naming the streams there are
        for name, _size, length in self.prompts:
            given = (prompts or {}).get(name)
            ids = self.prompt_ids(name, () if given is None else given)
            out += ids + [NULL] * (length - len(ids))
        return out

    def context_of(self, modality: str, sample: Any) -> list[int]:
        """The context of a stored sample (its ``condition``, ``caption_tokens`` and ``control_tokens``, as a
        token store's reader gives them), as the trainer lays it out: what this vocabulary has room for."""
        streams = {n for n, _s, _k in self.prompts}
        given = {"text": getattr(sample, "caption_tokens", None), "control": getattr(sample, "control_tokens", None)}
        return self.context(modality, sample.condition if self.classes else None,
                            {n: tokens for n, tokens in given.items() if n in streams and tokens})

    def is_condition(self, ids: torch.Tensor) -> torch.Tensor:
        """Where ``ids`` hold a class or prompt token: what classifier-free guidance drops."""
        lo, hi = self.class_range
        mask = (ids >= lo) & (ids < hi)
        for name, _s, _k in self.prompts:
            lo, hi = self.prompt_range(name)
            mask |= (ids >= lo) & (ids < hi)
        return mask

    def unconditional(self, context: torch.Tensor) -> torch.Tensor:
        """``context`` with every class and prompt token replaced by ``NULL`` (the CFG branch)."""
        return torch.where(self.is_condition(context), torch.full_like(context, NULL), context)

    # ------------------------------------------------------------ serialization

    def to_dict(self) -> dict[str, Any]:
        out = {"format": VOCAB_FORMAT, "modalities": [[n, s] for n, s in self.modalities],
               "classes": list(self.classes)}
        if self.prompts:
            out["prompts"] = [[n, s, k] for n, s, k in self.prompts]
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VocabLayout:
        if d.get("format") != VOCAB_FORMAT:
            raise ValueError(f"vocab format {d.get('format')!r} is not {VOCAB_FORMAT}; re-export the vocabulary")
        return cls(tuple((n, s) for n, s in d["modalities"]), tuple(d.get("classes", ())),
                   tuple((n, s, k) for n, s, k in d.get("prompts", ())))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> VocabLayout:
        return cls.from_dict(json.loads(text))

    def ranges(self) -> list[dict[str, Any]]:
        """Named ``[start, stop)`` ranges in the store manifest's ``VocabRange`` shape."""
        out = [{"name": "special", "start": 0, "stop": N_SPECIAL},
               {"name": "tags", "start": self.tags_start, "stop": self.classes_start}]
        if self.classes:
            out.append({"name": "classes", "start": self.classes_start, "stop": self.codes_start})
        out += [{"name": n, "start": self._starts[n], "stop": self._starts[n] + s} for n, s in self.modalities]
        out += [{"name": f"prompt:{n}", "start": self.prompt_range(n)[0], "stop": self.prompt_range(n)[1]}
                for n, _s, _k in self.prompts]
        return out


def drop_conditions(input_ids_BL: torch.Tensor, vocab: VocabLayout, p: float, *,
                    doc_ids_BL: torch.Tensor | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each document's class and prompt tokens by ``NULL`` with probability ``p`` (CFG training).

    One draw per document (per row when ``doc_ids_BL`` is None), so a document
    is either fully conditional or fully unconditional.
    """
    if p <= 0:
        return input_ids_BL
    B, L = input_ids_BL.shape
    docs_BL = torch.zeros_like(input_ids_BL) if doc_ids_BL is None else doc_ids_BL.long().clamp_min(0)
    n_docs = int(docs_BL.max()) + 1 if docs_BL.numel() else 1
    drop_BD = torch.rand(B, n_docs, generator=generator, device="cpu").to(input_ids_BL.device) < p
    drop_BL = torch.gather(drop_BD, 1, docs_BL)
    return torch.where(drop_BL & vocab.is_condition(input_ids_BL), torch.full_like(input_ids_BL, NULL), input_ids_BL)
