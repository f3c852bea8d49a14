"""The AR transformer: pre-norm decoder blocks (RMSNorm, SDPA attention with multi-axis RoPE, SwiGLU).

One ``forward`` serves training and decoding. Without a cache it lays out a
whole sequence and attends by group and document ids with the kernel that
``config.attention`` picks (``attention.layout_for``: causal SDPA, segments,
flex or the dense ``masks.attention_mask``); with a :class:`KVCache` it runs a
chunk of new positions written at ``start`` and attends the cached past
(``masks.cached_attention_mask``, dense). Pure torch: the launcher (DeepSpeed, Ray)
wraps this module, it never imports them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import Layout, layout_for
from .config import ModelConfig
from .masks import cached_attention_mask
from .rope import apply_rope, rope_angles
from .sequence import IGNORE_INDEX


class KVCache:
    """Preallocated keys and values of every layer, ``(B, H, max_len, D)`` each.

    A forward writes its chunk at ``start`` (an int, or one offset per row so
    rows may advance unevenly, as in speculative Jacobi decoding); slots past a
    row's chunk are stale and masked, so rolling back is just writing over them.
    """

    def __init__(self, config: ModelConfig, batch: int, max_len: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (batch, config.n_head, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.batch, self.max_len = batch, max_len

    def write(self, layer: int, k_BHQD: torch.Tensor, v_BHQD: torch.Tensor, start: int | torch.Tensor,
              n_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the chunk's keys/values; return the first ``n_keys`` slots of the layer."""
        Q = k_BHQD.shape[2]
        if isinstance(start, int):
            self.k[layer][:, :, start:start + Q] = k_BHQD
            self.v[layer][:, :, start:start + Q] = v_BHQD
        else:
            pos_BQ = start[:, None] + torch.arange(Q, device=start.device)
            rows_B1 = torch.arange(self.batch, device=start.device)[:, None]
            self.k[layer][rows_B1, :, pos_BQ] = k_BHQD.transpose(1, 2)
            self.v[layer][rows_B1, :, pos_BQ] = v_BHQD.transpose(1, 2)
        return self.k[layer][:, :, :n_keys], self.v[layer][:, :, :n_keys]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x_BLC: torch.Tensor, angle_BLP: torch.Tensor, layout: Layout,
                cache: KVCache | None = None, layer: int = 0, start: int | torch.Tensor = 0) -> torch.Tensor:
        B, L, C = x_BLC.shape
        q_BHLD, k_BHLD, v_BHLD = self.qkv(x_BLC).view(B, L, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        q_BHLD, k_BHLD = apply_rope(q_BHLD, angle_BLP), apply_rope(k_BHLD, angle_BLP)
        if cache is not None:
            k_BHLD, v_BHLD = cache.write(layer, k_BHLD, v_BHLD, start, layout.mask_B1LK.shape[-1])
        y_BHLD = layout.attend(q_BHLD, k_BHLD, v_BHLD)
        return self.proj(y_BHLD.transpose(1, 2).reshape(B, L, C))


class SwiGLU(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(config.n_embd, config.hidden_dim, bias=False)
        self.w3 = nn.Linear(config.n_embd, config.hidden_dim, bias=False)
        self.w2 = nn.Linear(config.hidden_dim, config.n_embd, bias=False)

    def forward(self, x_BLC: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x_BLC)) * self.w3(x_BLC))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x_BLC: torch.Tensor, angle_BLP: torch.Tensor, layout: Layout,
                cache: KVCache | None = None, layer: int = 0, start: int | torch.Tensor = 0) -> torch.Tensor:
        x_BLC = x_BLC + self.attn(self.attn_norm(x_BLC), angle_BLP, layout, cache, layer, start)
        return x_BLC + self.mlp(self.mlp_norm(x_BLC))


class Transformer(nn.Module):
    """Decoder-only AR model over one global vocabulary (``vocab.VocabLayout``)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config.validate()
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        # VAR's word_embed: code vectors of the accumulated coarser scales -> the residual stream
        self.feat_proj = nn.Linear(config.feature_dim, config.n_embd) if config.feature_dim else None
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.norm = nn.RMSNorm(config.n_embd, eps=config.norm_eps)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) weights; residual outputs scaled by 1/sqrt(2 n_layer) (GPT-2) so depth keeps
        the residual stream's variance. Call again after ``to_empty`` when built on the meta device."""
        std = self.config.init_std
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                scale = 1 / math.sqrt(2 * self.config.n_layer) if name.endswith(("attn.proj", "mlp.w2")) else 1.0
                nn.init.normal_(module.weight, mean=0.0, std=std * scale)
            elif isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _angles(self, coords_BLA: torch.Tensor) -> torch.Tensor:
        A = coords_BLA.shape[-1]
        if A > self.config.rope_axes:
            raise ValueError(f"tokens carry {A} coordinates but rope_axes is {self.config.rope_axes}")
        if A < self.config.rope_axes:
            coords_BLA = F.pad(coords_BLA, (0, self.config.rope_axes - A))
        return rope_angles(coords_BLA, self.config.head_dim, self.config.rope_theta)

    def forward(self, input_ids_BL: torch.Tensor, coords_BLA: torch.Tensor | None = None,
                group_ids_BL: torch.Tensor | None = None, doc_ids_BL: torch.Tensor | None = None,
                targets_BL: torch.Tensor | None = None, features_BLD: torch.Tensor | None = None,
                feature_mask_BL: torch.Tensor | None = None, *, cache: KVCache | None = None,
                start: int | torch.Tensor = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits ``(B, L, V)`` and, given targets, the mean cross-entropy over non-ignored targets.

        ``coords_BLA`` default to 1-D positions, ``group_ids_BL`` to one group
        per position (plain causal). With ``cache``, the ``L`` positions are a
        chunk written at ``start`` (an int or one offset per row) after the
        cached past; ``doc_ids_BL`` then does not apply (one document per row).
        ``features_BLD`` replace the token embedding where ``feature_mask_BL``
        is set (a model with ``feature_dim``; see ``sequence.ScaleInput``).
        """
        B, L = input_ids_BL.shape
        dev = input_ids_BL.device
        start_B = start if isinstance(start, torch.Tensor) else torch.full((B,), int(start), device=dev)
        if coords_BLA is None:
            pos_BL = (start_B[:, None] + torch.arange(L, device=dev)).float()
            coords_BLA = torch.stack([torch.zeros_like(pos_BL), pos_BL], dim=-1)
        if group_ids_BL is None:
            group_ids_BL = torch.arange(L, device=dev).expand(B, L)
        if cache is None:
            layout = layout_for(self.config.attention, group_ids_BL, doc_ids_BL)
        else:
            n_keys = int(start_B.max()) + L
            if n_keys > cache.max_len:
                raise ValueError(f"the KV cache holds {cache.max_len} positions; this chunk needs {n_keys}")
            layout = Layout(mask_B1LK=cached_attention_mask(group_ids_BL, start_B, n_keys))

        x_BLC = self.tok_emb(input_ids_BL)
        if features_BLD is not None and feature_mask_BL is not None:
            if self.feat_proj is None:
                raise ValueError("these inputs carry next-scale features but the model has feature_dim 0; "
                                 "lay them out without a ScaleInput")
            f_BLC = self.feat_proj(features_BLD.to(x_BLC.dtype))
            x_BLC = torch.where(feature_mask_BL.unsqueeze(-1), f_BLC, x_BLC)
        angle_BLP = self._angles(coords_BLA.to(torch.promote_types(x_BLC.dtype, torch.float32)))
        use_checkpoint = self.config.checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if use_checkpoint:
                x_BLC = checkpoint(block, x_BLC, angle_BLP, layout, use_reentrant=False)
            else:
                x_BLC = block(x_BLC, angle_BLP, layout, cache, i, start)
        logits_BLV = self.head(self.norm(x_BLC))
        if targets_BL is None:
            return logits_BLV, None
        flat = logits_BLV.float() if logits_BLV.dtype in (torch.float16, torch.bfloat16) else logits_BLV
        losses = F.cross_entropy(flat.reshape(-1, flat.shape[-1]), targets_BL.reshape(-1),
                                 ignore_index=IGNORE_INDEX, reduction="sum")
        count = (targets_BL != IGNORE_INDEX).sum().clamp_min(1)
        return logits_BLV, losses / count

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """A cache matching this model's dtype and device."""
        p = next(self.parameters())
        return KVCache(self.config, batch, max_len, dtype=p.dtype, device=p.device)
