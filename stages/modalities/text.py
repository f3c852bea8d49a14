"""The ``text`` tokenizer: captions and prompts to token ids, with Hugging Face ``tokenizers``.

Fitted on a source's captions (BPE or Unigram, byte-level so that any UTF-8 text encodes without an
unknown token, NFKC-normalised), or loaded from a user's own ``tokenizer.json`` (``file``; read from
disk, never downloaded). The learned tokenizer is the standard Hugging Face document: arpipe keeps
it in the artifact's weights (so the artifact's digest covers it) and writes it out as
``huggingface/tokenizer.json``, which ``tokenizers.Tokenizer.from_file`` and
``transformers.PreTrainedTokenizerFast.from_pretrained(<artifact>/huggingface)`` read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from arpipe.pipeline.storage import join, storage_for

from .base import Tokenizer, TokenizerError

HF_FILE = "huggingface/tokenizer.json"
PAD, UNK = "[PAD]", "[UNK]"
_STATE = "tokenizer_json"   # the Hugging Face document's UTF-8 bytes, as a uint8 tensor


def _texts(samples: Sequence[Any]) -> list[str]:
    texts = [str(s) for s in samples if s is not None and str(s).strip()]
    if not texts:
        raise TokenizerError("no text to fit the text tokenizer on (no sample has a caption)",
                             fix="set the source's captions: option, and check that its captions are found")
    return texts


class TextTokenizer(Tokenizer):
    """Text to a variable number of token ids; ``vocab_size`` is the fitted (or loaded) vocabulary's size."""

    type: ClassVar[str] = "text"

    def __init__(self, model: str = "bpe", vocab_size: int = 1024, lowercase: bool = False,
                 file: str | None = None):
        if model not in ("bpe", "unigram"):
            raise TokenizerError(f"unknown text tokenizer model {model!r}", fix="use bpe or unigram")
        self.model, self.target_size, self.lowercase, self.file = model, int(vocab_size), bool(lowercase), file
        self.fit_info: dict[str, Any] = {}
        self.provenance: dict[str, Any] = {}
        self._hf = None
        if file is not None:
            self._hf = self._from_json(self._read_file(file), file)

    # ------------------------------------------------------------- state

    @staticmethod
    def _read_file(file: str) -> str:
        try:
            return storage_for(file).read_bytes(file).decode("utf-8")
        except FileNotFoundError:
            raise TokenizerError("tokenizer file not found", where=file,
                                 fix="point file: at a Hugging Face tokenizer.json") from None
        except UnicodeDecodeError:
            raise TokenizerError("tokenizer file is not UTF-8 JSON", where=file,
                                 fix="point file: at a Hugging Face tokenizer.json") from None

    @staticmethod
    def _from_json(text: str, where: str):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            return HFTokenizer.from_str(text)
        except Exception as err:   # tokenizers raises a bare Exception for a document it cannot read
            raise TokenizerError(f"not a Hugging Face tokenizer.json ({err})", where=where,
                                 fix="save the tokenizer with tokenizers' Tokenizer.save") from None

    @property
    def hf(self):
        """The ``tokenizers.Tokenizer`` (fitted or loaded)."""
        if self._hf is None:
            raise TokenizerError("the text tokenizer is not fitted", fix="fit it on captions, or give file:")
        return self._hf

    def to_json(self) -> str:
        """The standard Hugging Face ``tokenizer.json`` document."""
        return self.hf.to_str()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        data = np.frombuffer(self.to_json().encode("utf-8"), dtype=np.uint8).copy()
        return {_STATE: torch.from_numpy(data)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self._hf = self._from_json(bytes(tensors[_STATE].numpy().tobytes()).decode("utf-8"), "weights.safetensors")

    def save(self, uri: str) -> str:
        """The artifact, with the Hugging Face file beside it for other tools (written before tokenizer.json)."""
        storage_for(uri).write_text(join(uri, HF_FILE), self.to_json())
        return super().save(uri)

    # ------------------------------------------------------------ layout

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def tokens_per_sample(self) -> int | None:
        return None

    def config(self) -> dict[str, Any]:
        return {"model": self.model, "vocab_size": self.target_size, "lowercase": self.lowercase, "file": self.file}

    def layout(self) -> dict[str, Any]:
        return {"axes": ["t"], "pad_id": self.hf.token_to_id(PAD)}

    def positions(self, idx_L: torch.Tensor | None = None) -> torch.Tensor:
        n = 0 if idx_L is None else int(idx_L.numel())
        return torch.arange(n, dtype=torch.int64)[:, None]

    # --------------------------------------------------------------- fit

    def fit(self, samples: Sequence[Any], **options: Any) -> TextTokenizer:
        """Learn the vocabulary from texts (captions); a tokenizer given by ``file`` is kept as it is."""
        texts = _texts(samples)
        if self.file is not None:
            return self
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if self.model == "bpe":
            hf = HFTokenizer(models.BPE(unk_token=UNK))
            trainer = trainers.BpeTrainer(vocab_size=self.target_size, special_tokens=[PAD, UNK],
                                          initial_alphabet=alphabet, show_progress=False)
        else:
            hf = HFTokenizer(models.Unigram())
            trainer = trainers.UnigramTrainer(vocab_size=self.target_size, special_tokens=[PAD, UNK],
                                              unk_token=UNK, initial_alphabet=alphabet, show_progress=False)
        steps = [normalizers.NFKC()] + ([normalizers.Lowercase()] if self.lowercase else [])
        hf.normalizer = normalizers.Sequence(steps)
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        hf.train_from_iterator(texts, trainer, length=len(texts))
        self._hf = hf
        self.fit_info = {"texts": len(texts)}
        return self

    # ------------------------------------------------------- encode/decode

    def encode_texts(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int64) for e in self.hf.encode_batch([str(t) for t in texts])]

    def decode_texts(self, tokens: Sequence[np.ndarray]) -> list[str]:
        return self.hf.decode_batch([[int(t) for t in np.asarray(ids).reshape(-1)] for ids in tokens])

    def normalize_all(self, texts: Sequence[str]) -> list[str]:
        """Texts as the tokenizer sees them (its normaliser applied): what a round trip gives back."""
        norm = self.hf.normalizer
        return [t if norm is None else norm.normalize_str(t) for t in texts]

    def encode_arrays(self, arrays: Sequence[Any]) -> list[np.ndarray]:
        """Texts (``str``, or 0-d string arrays) to token ids."""
        return self.encode_texts([str(np.asarray(a)) if isinstance(a, np.ndarray) else str(a) for a in arrays])

    def decode_arrays(self, tokens: Sequence[np.ndarray]) -> list[Any]:
        return self.decode_texts(tokens)

    def describe(self) -> dict[str, Any]:
        doc = super().describe()
        doc["huggingface"] = HF_FILE
        return doc

