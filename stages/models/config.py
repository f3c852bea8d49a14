"""``ModelConfig``: the single source of a model's shape, its presets and its checks.

A config is plain data: ``to_dict``/``from_dict`` round-trip through JSON
(``model_args`` in a saved model), so a checkpoint can be rebuilt without
importing the code that trained it. ``validate`` turns every inconsistency a
launcher could hit later (heads not dividing the width, a vocabulary smaller
than the data's largest token, ...) into one ``ValueError`` that says the fix.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

Paradigm = Literal["next_token", "next_scale", "next_block", "masked", "next_level"]
PARADIGMS: tuple[str, ...] = ("next_token", "next_scale", "next_block", "masked", "next_level")
AttentionKernel = Literal["auto", "sdpa", "flex", "dense"]
ATTENTION_KERNELS: tuple[str, ...] = ("auto", "sdpa", "flex", "dense")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and behaviour of a decoder-only AR transformer.

    ``rope_axes`` is the number of coordinates every token carries (axis 0 is
    the level or scale, the rest are grid axes); ``head_dim / 2`` rotary pairs
    are split across them. ``mlp_hidden = 0`` derives the SwiGLU width as
    ``8/3 * n_embd`` rounded up to ``multiple_of`` (LLaMA's rule).
    ``block_size`` is the number of tokens predicted in parallel by
    ``next_block`` (``masked``, MaskGIT, predicts masked tokens of one bidirectional
    group: see ``maskgit.py``; ``next_level`` one octree level: see ``levels.py``);
    ``cond_dropout`` is the probability that training replaces
    a document's class token by the null token (classifier-free guidance).
    ``attention`` picks the attention kernel of whole-sequence forwards (``attention.py``);
    every choice computes the same result as the dense mask.
    """

    vocab_size: int = 1024
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    mlp_hidden: int = 0
    multiple_of: int = 32
    max_seq_len: int = 1024
    paradigm: Paradigm = "next_token"
    block_size: int = 1
    rope_axes: int = 4
    rope_theta: float = 100.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    tie_embeddings: bool = False
    cond_dropout: float = 0.1
    checkpointing: bool = False
    feature_dim: int = 0
    attention: AttentionKernel = "dense"

    # ------------------------------------------------------------ derived

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def hidden_dim(self) -> int:
        if self.mlp_hidden:
            return self.mlp_hidden
        h = int(8 * self.n_embd / 3)
        return -(-h // self.multiple_of) * self.multiple_of

    # ------------------------------------------------------------ checks

    def validate(self, *, max_token: int | None = None, seq_len: int | None = None) -> ModelConfig:
        """Raise ``ValueError`` naming the field and the fix; return ``self`` so calls chain.

        ``max_token`` is the largest token id the data holds (it must fit the
        vocabulary); ``seq_len`` the training sequence length (it must fit
        ``max_seq_len``, which sizes KV caches).
        """
        problems: list[str] = []
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "max_seq_len", "block_size", "rope_axes",
                     "multiple_of"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_head >= 1 and self.n_embd % self.n_head:
            problems.append(f"n_head ({self.n_head}) does not divide n_embd ({self.n_embd}); "
                            f"choose n_embd a multiple of n_head, e.g. {self.n_head * max(1, self.n_embd // self.n_head)}")
        elif self.n_head >= 1 and self.rope_axes >= 1:
            if self.head_dim % 2:
                problems.append(f"head_dim ({self.head_dim} = n_embd / n_head) must be even for rotary pairs")
            elif self.head_dim // 2 < self.rope_axes:
                problems.append(f"head_dim ({self.head_dim}) gives {self.head_dim // 2} rotary pairs, fewer than "
                                f"rope_axes ({self.rope_axes}); use fewer heads or fewer axes")
        if self.paradigm not in PARADIGMS:
            problems.append(f"paradigm {self.paradigm!r} is unknown; use one of {', '.join(PARADIGMS)}")
        if self.paradigm != "next_block" and self.block_size != 1:
            problems.append(f"block_size {self.block_size} applies to next_block only; set it to 1 for {self.paradigm}")
        if self.feature_dim < 0:
            problems.append(f"feature_dim must be >= 0 (0 = token inputs only), got {self.feature_dim}")
        elif self.feature_dim and self.paradigm != "next_scale":
            problems.append(f"feature_dim {self.feature_dim} (VAR's accumulated input) applies to next_scale only; "
                            f"set it to 0 for {self.paradigm}")
        if self.attention not in ATTENTION_KERNELS:
            problems.append(f"attention {self.attention!r} is unknown; use one of {', '.join(ATTENTION_KERNELS)}")
        if self.mlp_hidden < 0:
            problems.append(f"mlp_hidden must be >= 0 (0 derives it), got {self.mlp_hidden}")
        if not 0.0 <= self.cond_dropout < 1.0:
            problems.append(f"cond_dropout must lie in [0, 1), got {self.cond_dropout}")
        if self.rope_theta <= 1.0:
            problems.append(f"rope_theta must be > 1, got {self.rope_theta}")
        if self.norm_eps <= 0 or self.init_std <= 0:
            problems.append("norm_eps and init_std must be positive")
        if max_token is not None and max_token >= self.vocab_size:
            problems.append(f"the data holds token {max_token} but vocab_size is {self.vocab_size}; "
                            f"raise vocab_size to at least {max_token + 1}")
        if seq_len is not None and seq_len > self.max_seq_len:
            problems.append(f"sequences of {seq_len} tokens exceed max_seq_len {self.max_seq_len}; "
                            f"raise max_seq_len to at least {seq_len}")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))
        return self

    # ------------------------------------------------------------ serialization

    def to_dict(self) -> dict[str, Any]:
        """``model_args``: JSON-able keyword arguments that rebuild this config."""
        return asdict(self)

    @classmethod
    def from_dict(cls, args: dict[str, Any]) -> ModelConfig:
        """Missing keys take their defaults, so configs saved before a field existed still load."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"unknown model_args {unknown}; known fields: {', '.join(sorted(known))}")
        return cls(**args)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        return cls.from_dict(json.loads(text))


# Shapes follow LLaMA-style ratios (head_dim 32 for tiny, 64 for small, 128 above).
# Parameter counts include embeddings and head at the preset's default vocabulary
# (16384 codes plus specials for the large ones); ``presets_param_count`` checks them.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=1024, n_layer=4, n_head=4, n_embd=128, multiple_of=32, max_seq_len=1024),
    "small": dict(vocab_size=16448, n_layer=11, n_head=12, n_embd=768, multiple_of=256, max_seq_len=2048),
    "1b": dict(vocab_size=16448, n_layer=18, n_head=16, n_embd=2048, multiple_of=256, max_seq_len=4096),
    "3b": dict(vocab_size=16448, n_layer=26, n_head=24, n_embd=3072, multiple_of=256, max_seq_len=4096),
}
#: the parameter count each preset's name promises
PRESET_SIZES: dict[str, int] = {"tiny": 1_000_000, "small": 100_000_000, "1b": 1_000_000_000, "3b": 3_000_000_000}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named shape, with any field overridden (``preset("small", vocab_size=600, paradigm="next_scale")``)."""
    try:
        base = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; use one of {', '.join(PRESETS)}") from None
    return replace(ModelConfig(**base), **overrides)


def count_parameters(config: ModelConfig) -> int:
    """Parameter count from the shape alone (agrees with ``sum(p.numel())`` of the built model)."""
    d, h, L, V = config.n_embd, config.hidden_dim, config.n_layer, config.vocab_size
    per_layer = 4 * d * d + 3 * d * h + 2 * d
    features = (config.feature_dim + 1) * d if config.feature_dim else 0
    return V * d * (1 if config.tie_embeddings else 2) + L * per_layer + d + features
