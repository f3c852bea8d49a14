"""Fit a vqvae tokenizer data-parallel on Ray Train: one torch process per worker (gloo on CPU, NCCL on GPU).

The samples reach the workers once: as one stacked float32 array in Ray's object
store (workers on a node share it without copying), or as the path of a local
``.npy`` file that every worker memory-maps. Every worker builds the same
:class:`VQVAE` and calls :meth:`VQVAE.fit`, which sees the process group Ray
Train set up and shards the samples by rank. Rank 0 reports the fitted tokenizer
as a checkpoint that is a tokenizer artifact folder (``Tokenizer.save``), and
the driver loads it back with its digests checked.

Every call fits afresh: Ray Train offers the latest checkpoint of an earlier
run under the same ``<storage_dir>/vqvae-fit`` to the workers, and they ignore
it, so the tokenizer returned is always the one this call fitted.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from arpipe.stages.modalities.vqvae import VQVAE

RUN_NAME = "vqvae-fit"


def fit_vqvae_on_ray(tok_config: dict[str, Any], arrays_uri_or_arrays: str | np.ndarray | Sequence[np.ndarray],
                     fit_options: dict[str, Any], workers: int, use_gpu: bool, storage_dir: str) -> VQVAE:
    """Fit ``VQVAE(**tok_config)`` with ``fit(samples, **fit_options)`` on ``workers`` Ray Train workers.

    ``arrays_uri_or_arrays`` is a ``.npy`` path every worker's node can read (memory-mapped) or the
    samples themselves (stacked once and put in the object store). ``storage_dir`` holds the
    Ray Train run ``vqvae-fit`` (local path or ``s3://``). Errors in the samples or options
    (wrong shape, fewer samples than workers) are raised here, before any worker starts.
    """
    import ray
    import torch
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from arpipe.stages.modalities.base import as_batch, check_input_shape, load_tokenizer
    from arpipe.stages.modalities.vqvae import VQVAE, check_data_parallel

    tok = VQVAE(**tok_config)  # config, shape and count errors are raised here, where they read best
    from_file = isinstance(arrays_uri_or_arrays, str)
    samples = np.load(arrays_uri_or_arrays, mmap_mode="r") if from_file else as_batch(arrays_uri_or_arrays).numpy()
    check_input_shape(torch.empty(0, *samples.shape[1:]), tok.input_shape, tok.type)
    check_data_parallel(samples.shape[0], int(fit_options.get("batch_size", 64)), workers)
    data = {"npy": os.path.abspath(arrays_uri_or_arrays)} if from_file else {"ref": ray.put(samples)}
    del samples  # the workers read the file or the object store's copy

    storage_path = storage_dir if "://" in storage_dir else os.path.abspath(storage_dir)
    trainer = TorchTrainer(
        _fit_worker,
        train_loop_config={"tok_config": tok_config, "data": data, "fit_options": fit_options},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        run_config=RunConfig(storage_path=storage_path, name=RUN_NAME),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {RUN_NAME!r} under {storage_path} ended without a checkpoint")
    with result.checkpoint.as_directory() as folder:
        fitted = load_tokenizer(folder, device=tok_config.get("device", "auto"))
    if not isinstance(fitted, VQVAE):
        raise RuntimeError(f"checkpoint of {RUN_NAME!r} under {storage_path} holds a {fitted.type}, not a vqvae")
    return fitted


def _fit_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: fit on this rank's shard; rank 0 reports the artifact as the checkpoint."""
    import ray
    import ray.train
    from ray.train import Checkpoint
    from ray.train.torch import get_device

    from arpipe.stages.modalities.vqvae import VQVAE

    rank = ray.train.get_context().get_world_rank()
    data = config["data"]
    samples = np.load(data["npy"], mmap_mode="r") if "npy" in data else ray.get(data["ref"])
    tok = VQVAE(**{**config["tok_config"], "device": str(get_device())})
    with warnings.catch_warnings():
        # the shared samples are read-only and fit only reads them: torch's warning about that is noise
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tok.fit(samples, **config["fit_options"])
    metrics = {"steps": tok.fit_info["steps"], "recon": tok.fit_info["curve"][-1]["recon"]}
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            tok.save(folder)
            checkpoint = Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint)
