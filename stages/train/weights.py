"""Which weights a train stage saves: the fp32 master weights in every precision, and their EMA beside them.

In fp32 the module's weights are the master weights: rank 0 writes them into the final checkpoint's
``model/`` (gathered from the partitions first under ZeRO-3). Under bf16/fp16 the module holds half-precision
copies and the optimizer the fp32 masters, which the model folder holds instead:

- ZeRO-1/2/3, offload included (DeepSpeed's ZeRO optimizers): every rank's part of a checkpoint holds its
  partition of the fp32 weights; once Ray Train merged the final checkpoint's parts, the stage consolidates
  them with DeepSpeed's own ``get_fp32_state_dict_from_zero_checkpoint`` (``zero_to_fp32``, :func:`zero_to_fp32`);
- ZeRO-0 (DeepSpeed's fp16 optimizers, which also serve bf16): every rank keeps whole fp32 copies, but
  DeepSpeed saves no file ``zero_to_fp32`` reads: rank 0 writes the optimizer's copies, as in fp32;
- DeepSpeed's bf16 optimizer (ZeRO-1 with fp32 gradient accumulation, ``data_types.grad_accum_dtype`` in
  ``deepspeed.config``) saves partitions ``zero_to_fp32`` does not read: the ranks gather them with
  DeepSpeed's ``safe_get_full_fp32_param`` and rank 0 writes them.

:func:`master_shares` is each rank's share of those fp32 weights, which the EMA (``ema``) averages;
:func:`finish_model` writes the model folder from the final checkpoint: the weights, and with ``ema:`` every
rank's EMA shares merged into ``ema.safetensors``.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from arpipe.stages.train.ema import PATTERN as EMA_PATTERN
from arpipe.stages.train.ema import Share, merge, whole_shares

if TYPE_CHECKING:
    import torch


def _half(engine) -> bool:
    return bool(engine.bfloat16_enabled() or engine.fp16_enabled())


def _bf16_optimizer(engine) -> bool:
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    return isinstance(engine.optimizer, BF16_Optimizer)


def in_checkpoint(engine) -> bool:
    """True where the stage reads the fp32 master weights out of the final checkpoint with ``zero_to_fp32``:
    bf16/fp16 under one of DeepSpeed's ZeRO optimizers (stages 1-3, offload included)."""
    return _half(engine) and bool(engine.zero_optimization()) and not _bf16_optimizer(engine)


def _fp16_optimizer_masters(optimizer) -> dict[int, torch.Tensor]:
    """ZeRO-0 under bf16/fp16: the whole fp32 copy of each parameter DeepSpeed's fp16 optimizer keeps on every
    rank (``fp32_groups``; flat ``fp32_groups_flat`` in the fused one, laid out as the parameters one after
    another), by ``id`` of the module's parameter."""
    masters: dict[int, Any] = {}
    for i, group in enumerate(optimizer.fp16_groups):
        if hasattr(optimizer, "fp32_groups"):
            masters.update({id(p): m for p, m in zip(group, optimizer.fp32_groups[i], strict=True)})
            continue
        offset, flat = 0, optimizer.fp32_groups_flat[i]
        for p in group:
            masters[id(p)] = flat.narrow(0, offset, p.numel()).view_as(p)
            offset += p.numel()
    return masters


def master_shares(engine) -> list[Share]:
    """This rank's share of the fp32 master weights of every trained parameter, as views (no copy): its
    ZeRO-3 partitions (the padding left out), its ZeRO-1/2 fragments (DeepSpeed's link of each parameter to
    its piece of the rank's fp32 partition, which ``safe_get_full_fp32_param`` reads too), or under ZeRO-0
    whole parameters."""
    module = engine.module
    trained = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    if engine.zero_optimization_stage() == 3:
        import torch.distributed as dist
        from deepspeed.utils import safe_get_local_fp32_param

        shares = []
        for name, p in trained:
            local = (safe_get_local_fp32_param(p) if _half(engine) else p.ds_tensor).reshape(-1)
            start = dist.get_rank(group=p.ds_process_group) * p.partition_numel()
            length = max(0, min(local.numel(), p.ds_numel - start))
            if length:
                shares.append(Share(name, start, p.ds_numel, local[:length]))
        return shares
    if any(hasattr(p, "_hp_mapping") for _, p in trained):   # ZeRO-1/2 and the bf16 optimizer
        return [Share(name, p._hp_mapping.lp_fragment_address.start, p.numel(), p._hp_mapping.get_hp_fragment())
                for name, p in trained if p._hp_mapping is not None]
    masters = _fp16_optimizer_masters(engine.optimizer) if _half(engine) else {}
    return whole_shares((name, masters.get(id(p), p)) for name, p in trained)


def rank_masters(engine, rank: int) -> dict[str, torch.Tensor] | None:
    """The whole fp32 master weights as a state dict, on rank 0, where the ranks consolidate them; None on the
    other ranks and where the stage reads them from the checkpoint (:func:`in_checkpoint`). Every rank calls
    it: ZeRO-3 gathers, and so does the bf16 optimizer."""
    import deepspeed

    if in_checkpoint(engine):
        return None
    module = engine.module
    masters: dict[int, Any] = {}
    if _half(engine) and _bf16_optimizer(engine):
        from deepspeed.utils import safe_get_full_fp32_param

        masters = {id(p): safe_get_full_fp32_param(p) for p in module.parameters() if p.requires_grad}
    elif _half(engine):
        masters = _fp16_optimizer_masters(engine.optimizer)
    gathered = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None) \
        if engine.zero_optimization_stage() == 3 else contextlib.nullcontext()
    with gathered:
        if rank != 0:
            return None
        state = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    for name, p in module.named_parameters(remove_duplicate=False):   # both names of a tied weight
        if id(p) in masters:
            state[name] = masters[id(p)].detach().float().cpu().reshape(state[name].shape).clone()
    return state


def zero_to_fp32(checkpoint: Path, config) -> dict[str, torch.Tensor]:
    """The fp32 master weights in a ZeRO checkpoint holding every rank's part, by DeepSpeed's own
    ``get_fp32_state_dict_from_zero_checkpoint``. A parameter it leaves out (a frozen one under ZeRO-1, which
    saves no copy of it) comes from the checkpoint's module state: it never changed."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from arpipe.stages.models import Transformer

    tag = (checkpoint / "latest").read_text().strip()
    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=tag)
    with torch.device("meta"):
        wanted = list(Transformer(config).state_dict())
    missing = [k for k in wanted if k not in state]
    if missing:
        states = sorted((checkpoint / tag).glob("*model_states.pt"))[0]
        module = torch.load(states, map_location="cpu", weights_only=True)["module"]   # tensors and plain types only
        state.update({k: module[k].float() for k in missing})
    return {k: state[k].float() for k in wanted}


def finish_model(checkpoint: Path, model_dir: Path, *, config, vocab, scale_inputs: dict[str, Any]) -> None:
    """Write the model folder ``model_dir`` from the final ``checkpoint`` (every rank's part, merged by Ray
    Train): the fp32 master weights, and the EMA when the ranks kept one."""
    from arpipe.stages.models.io import load_model, model_from_state, save_model

    ranks = checkpoint / "model"   # rank 0 consolidated the weights (fp32, ZeRO-0, the bf16 optimizer)
    ema_files = sorted(checkpoint.glob(EMA_PATTERN))
    if ranks.is_dir() and not ema_files:
        shutil.copytree(ranks, model_dir)
        return
    model = load_model(ranks) if ranks.is_dir() else model_from_state(config, zero_to_fp32(checkpoint, config))
    ema = None
    if ema_files:
        merged = merge(ema_files)
        ema = {k: merged.get(k, v) for k, v in model.state_dict().items()}   # frozen: never averaged
    save_model(model_dir, model, vocab=vocab, scale_inputs=scale_inputs, ema=ema)
