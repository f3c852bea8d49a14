"""The per-worker training loop Ray Train runs: DeepSpeed engine, data position, checkpoints, metrics.

Every rank builds the same model (same seed), wraps it in a DeepSpeed engine
on the process group Ray Train set up, and resumes from the latest checkpoint
if there is one — weights, optimizer, LR schedule *and* the sampler's
position, which rides in DeepSpeed's ``client_state``. A checkpoint is every
rank's ``save_checkpoint`` reported to Ray Train together; it counts once
every rank's part is in, and each part carries a marker listing its files'
digests (``checkpoints``): a damaged checkpoint is skipped for the newest
whole one, and the log says so. The last checkpoint also holds the consolidated
fp32 weights (``model/``, gathered across ranks for ZeRO-3) where the ranks
consolidate them; under bf16/fp16 with a ZeRO optimizer the stage reads
DeepSpeed's fp32 master weights out of it instead (``weights``). With ``ema:``
each rank keeps the EMA of its share of the master weights (``ema``), updated
after every ``every``-th optimizer step and saved in every checkpoint.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from arpipe.pipeline.lineage import RunLog
from arpipe.pipeline.progress import Progress, write_line
from arpipe.stages.train.checkpoints import restore, write_marker
from arpipe.stages.train.config import TrainLoopConfig

#: dense bf16 peak FLOP/s by GPU name, for MFU (None on CPU or unknown GPUs)
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def _peak_flops(torch) -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def _units(sampler):
    """An endless stream of this rank's units; the sampler moves itself to the next epoch."""
    while True:
        produced = False
        for unit in sampler:
            produced = True
            yield unit
        if not produced:
            raise RuntimeError("the sampler gave this rank no data: fewer samples than workers x micro_batch")


def skip_inference_comm_op() -> None:
    """Tell DeepSpeed not to build its shared-memory communication op: training never uses it.

    On CPU, DeepSpeed's ``TorchBackend`` JIT-compiles ``deepspeed_shm_comm`` when the first engine is
    made (40-50 s of C++ on a fresh machine or container, in every worker at once) for one caller,
    ``inference_all_reduce``, which training does not reach: gradients go through ``torch.distributed``
    (gloo here). The build also guarded itself with a plain ``lock`` file that a worker killed mid-build
    left behind, and every later train stage on that machine then waited for it forever. Marking the
    op incompatible is what DeepSpeed itself does where the op cannot build (non-Linux); the engine then
    uses ``torch.distributed`` alone. Another DeepSpeed layout: left as DeepSpeed decides.
    """
    try:
        import deepspeed.ops
        from deepspeed.accelerator import get_accelerator

        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is not None:
            deepspeed.ops.__compatible_ops__[builder.NAME] = False
    except Exception:   # noqa: BLE001 - an optimisation only
        return


def train_loop(cfg: TrainLoopConfig) -> None:
    import deepspeed
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from ray.train import Checkpoint

    from arpipe.stages.models import (
        Transformer,
        compile_blocks,
        drop_conditions,
        mask_for_training,
        mix_objectives,
        save_model,
    )
    from arpipe.stages.store import DistributedSampler, LengthGroupedOrder, megabatch_size
    from arpipe.stages.store.sampler import order_for
    from arpipe.stages.train.data import Documents, open_source
    from arpipe.stages.train.ema import Ema
    from arpipe.stages.train.init import apply_initial_weights, freeze
    from arpipe.stages.train.weights import master_shares

    os.environ.update(cfg.env)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)
    vocab, model_config = cfg.vocab, cfg.model
    source = open_source(cfg.uris, list(cfg.weights))
    grouped = cfg.group_by_length and not cfg.packing
    docs = Documents(source, list(cfg.summaries), list(cfg.names), vocab, paradigm=model_config.paradigm,
                     block_size=model_config.block_size, n_axes=model_config.rope_axes, seq_len=cfg.seq_len,
                     scale_inputs=cfg.scale_inputs, group_by_length=grouped)
    order = order_for(source, seed=cfg.seed)
    if grouped:   # Hugging Face's megabatches of 50 global batches, each sorted by length
        global_batch = cfg.micro_batch * cfg.grad_accum * world
        order = LengthGroupedOrder(order, docs.lengths(), megabatch_size(len(order), global_batch))
    sampler = DistributedSampler(order, rank=rank, world_size=world, seed=cfg.seed, tail="wrap",
                                 seq_len=cfg.seq_len if cfg.packing else None,
                                 lengths=docs.lengths() if cfg.packing else None)
    model = Transformer(model_config)
    if cfg.init is not None:   # before anything copies the weights (a checkpoint, when there is one, wins)
        apply_initial_weights(model, cfg.init)
    freeze(model, cfg.freeze)
    compiled = None   # why the blocks stay eager, when compile was asked for and cannot run
    if cfg.compile:   # regional: each block compiled once for all of them
        compiled = compile_blocks(model, zero_stage=cfg.ds_config["zero_optimization"]["stage"],
                                  device=ray.train.torch.get_device())
        if compiled is not None and rank == 0:
            write_line(f"[{cfg.stage}] compile: {compiled}; training eagerly")
    skip_inference_comm_op()
    engine, _opt, _loader, _sched = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=cfg.ds_config)
    step, restarts = 0, 0
    # the checkpoint Ray Train hands over is checked first; a damaged one is skipped for the newest whole one
    # the EMA starts from the initial weights; a checkpoint brings back its own (read with DeepSpeed's state)
    ema = Ema(master_shares(engine), decay=cfg.ema.decay, every=cfg.ema.every) if cfg.ema is not None else None
    restored = restore(engine, ray.train.get_checkpoint(), world=world,
                       also=(lambda folder: ema.load(folder, rank)) if ema is not None else None)
    client = restored.client_state
    if client is not None:
        step, restarts = int(client["step"]), int(client.get("restarts", 0)) + 1
        sampler.load_state_dict(client["sampler"])
    # rank 0 logs to the stage's nested run, batched to keep the tracking store's writes few
    metrics = RunLog(cfg.tracking_uri, cfg.mlflow_run_id if rank == 0 else None)
    if cfg.compile and rank == 0:
        metrics.set_tag("arpipe.compile", "blocks" if compiled is None else f"eager: {compiled}")
    if restored.skipped:
        metrics.buffer_metrics({"checkpoints_skipped": len(restored.skipped)}, step)
        if rank == 0:
            metrics.set_tag("arpipe.checkpoints_skipped", "; ".join(
                f"step {s}: {what}" for s, what in restored.skipped)[:5000])
            for line in restored.lines(cfg.stage):
                write_line(line)
    if client is not None:
        metrics.buffer_metrics({"resumed_at_step": step, "restarts": restarts}, step)
        if rank == 0:
            write_line(f"[{cfg.stage}] resumed at step {step} (restart {restarts}) with the data position of "
                       "that checkpoint")
    heldout = _heldout(cfg, vocab, model_config, rank, world)
    units = _units(sampler)
    n_params = sum(p.numel() for p in model.parameters()) if cfg.ds_config["zero_optimization"]["stage"] < 3 \
        else cfg.n_params
    peak = _peak_flops(torch)
    total, accum, micro = cfg.total_steps, cfg.grad_accum, cfg.micro_batch
    # rank 0 prints a line every print_every steps or at least every 10 s, whichever comes first
    progress = Progress(cfg.stage, total, start=step, every_steps=cfg.print_every)
    metrics.watch_system(resumed=client is not None)    # rank 0's machine, in the stage's run
    while step < total:
        started = time.perf_counter()
        loss_sum, target_tokens = torch.zeros((), dtype=torch.float64), 0
        for m in range(accum):
            batch = docs.rows([next(units) for _ in range(micro)])
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1009 + m * 101 + rank)
            batch.input_ids = drop_conditions(batch.input_ids, vocab, model_config.cond_dropout,
                                              doc_ids_BL=batch.doc_ids, generator=gen)
            if model_config.paradigm == "masked":   # MaskGIT: a cosine-scheduled share of each document masked
                batch = mask_for_training(batch, gen)
            elif cfg.objective is not None:   # TokenUnify: each document under one of the mixed objectives
                batch = mix_objectives(batch, cfg.objective, gen)
            batch = batch.to(engine.device)
            _logits, loss = engine(**batch.as_kwargs())
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach().double().cpu()
            target_tokens += int((batch.target_ids != -100).sum())
        step += 1
        if ema is not None and ema.due(step):   # after the optimizer step, which the last micro-batch took
            ema.update(master_shares(engine))
        stats = torch.tensor([float(loss_sum) / accum, float(target_tokens)], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(stats)
        seconds = time.perf_counter() - started
        tokens_per_s = float(stats[1]) / seconds
        if step % cfg.log_every == 0 or step == total:
            grad_norm = engine.get_global_grad_norm()
            row = {"loss": float(stats[0]) / world, "lr": engine.get_lr()[0], "tokens_per_s": tokens_per_s,
                   "grad_norm": float(grad_norm) if grad_norm is not None else None}
            if peak:
                row["mfu"] = 6 * n_params * tokens_per_s / (peak * world)
            metrics.buffer_metrics(row, step)
        if rank == 0 and progress.due(step):
            progress.update(step, loss=float(stats[0]) / world, lr=engine.get_lr()[0], tokens_per_s=tokens_per_s)
        if heldout is not None and (step % cfg.eval_every == 0 or step == total):
            metrics.buffer_metrics(heldout.evaluate(engine, world), step)
        if step % cfg.checkpoint_every == 0 or step == total:
            metrics.flush()
            with tempfile.TemporaryDirectory() as folder:
                engine.save_checkpoint(folder, tag=f"step{step:08d}",
                                       client_state={"step": step, "sampler": sampler.state_dict(),
                                                     "restarts": restarts})
                if ema is not None:
                    ema.save(Path(folder), rank)
                if step == total:
                    _save_consolidated(engine, model_config, vocab, cfg.scale_inputs, Path(folder) / "model",
                                       rank, save_model)
                write_marker(Path(folder), rank=rank, world=world, step=step)   # last: it vouches for the rest
                ray.train.report({"step": step, "loss": float(stats[0]) / world}, checkpoint=Checkpoint.from_directory(folder))
    metrics.stop_watching()
    metrics.flush()


def _save_consolidated(engine, model_config, vocab, scale_inputs, folder: Path, rank: int, save_model) -> None:
    """Full fp32 master weights on rank 0 where the ranks consolidate them (ZeRO-3 partitions are gathered
    first, on every rank); where DeepSpeed's checkpoint holds them, the stage reads them from it (``weights``)."""
    import torch

    from arpipe.stages.models import Transformer
    from arpipe.stages.train.weights import rank_masters

    state = rank_masters(engine, rank)
    if state is not None:
        full = Transformer(model_config)
        full.load_state_dict(state, strict=True)
        save_model(folder, full.to(torch.float32), vocab=vocab, scale_inputs=scale_inputs)


def _heldout(cfg: TrainLoopConfig, vocab, model_config, rank: int, world: int):
    """A fixed list of held-out micro-batches for this rank (the first samples of the held-out store)."""
    if cfg.heldout is None:
        return None
    from arpipe.stages.models.diagnostics import BY_GROUP, PARTS
    from arpipe.stages.store import TokenStore
    from arpipe.stages.train.data import Documents

    summary = cfg.heldout
    store = TokenStore.open(summary.uri)
    names = [cfg.names[cfg.uris.index(summary.uri)]] if summary.uri in cfg.uris else [cfg.heldout_name]
    docs = Documents(store, [summary], names, vocab, paradigm=model_config.paradigm,
                     block_size=model_config.block_size, n_axes=model_config.rope_axes, seq_len=cfg.seq_len,
                     scale_inputs=cfg.scale_inputs)
    # the same number of batches on every rank: ZeRO-3 forwards gather parameters collectively
    usable = (min(len(store), cfg.heldout_samples) // world) * world
    ids = list(range(usable))[rank::world]
    micro = cfg.micro_batch
    plan = docs.plans[0]
    if plan is None:
        n_segments = PARTS
    else:
        n_segments = plan.n_groups if model_config.paradigm in BY_GROUP else min(PARTS, plan.n_groups)
    batches = [docs.rows(ids[i:i + micro]) for i in range(0, len(ids), micro)]
    if model_config.paradigm == "masked":   # the masked-token loss under one fixed draw of the training masks
        import torch

        from arpipe.stages.models import mask_for_training

        masks = torch.Generator().manual_seed(cfg.seed * 1_000_003 + rank)
        batches = [mask_for_training(batch, masks) for batch in batches]
    return HeldOut(batches, model_config.paradigm, n_segments)


class HeldOut:
    """This rank's held-out micro-batches, scored teacher-forced as a whole and per segment (scale or part)."""

    def __init__(self, batches: list, paradigm: str, n_segments: int):
        self.batches, self.paradigm, self.n_segments = batches, paradigm, n_segments

    def evaluate(self, engine, world: int) -> dict[str, float]:
        """``heldout_loss`` and ``heldout/<segment>/loss|accuracy`` (nats per token, top-1 share)."""
        import torch
        import torch.distributed as dist

        from arpipe.stages.models import segment_names, segment_scores

        total = torch.zeros(3, self.n_segments, dtype=torch.float64)
        engine.eval()
        with torch.no_grad():
            for batch in self.batches:
                batch = batch.to(engine.device)
                logits, _loss = engine(**batch.as_kwargs())
                total += segment_scores(logits, batch.target_ids, batch.group_ids, self.paradigm,
                                        self.n_segments).cpu()
        engine.train()
        if world > 1:
            dist.all_reduce(total)
        out = {"heldout_loss": float(total[0].sum() / total[2].sum().clamp_min(1))}
        for k, name in enumerate(segment_names(self.paradigm, self.n_segments)):
            if total[2, k] > 0:
                out[f"heldout/{name}/loss"] = float(total[0, k] / total[2, k])
                out[f"heldout/{name}/accuracy"] = float(total[1, k] / total[2, k])
        return out
