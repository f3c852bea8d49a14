"""Train-stage throughput (issue 6), measured side by side in one run.

- tokens/s of the train stage with 1 Ray Train worker (ZeRO-2, fp32, CPU) / a plain PyTorch loop of the
  same model, batch and optimizer (torch AdamW), one thread each (goal >= 0.85);
- 2 workers / 1 worker (report; on 2 cores the workers share the machine with Ray itself).
Stage tokens/s is the median of the per-step `tokens_per_s` it logs to MLflow, after warm-up steps.
Prints the ratios last; writes benchmarks/results/train.json.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

STEPS, WARMUP, BATCH = 40, 10, 32
PIPELINE = """
name: trainbench
storage: ./runs
stages:
  tok:
    kind: tokenizer
    source: {{modality: image, uri: ./data, channels: 1, size: 8}}
    tokenizer: {{type: msvq, scales: [1, 2, 4, 8], codebook_size: 64}}
    fit: {{max_samples: 300, heldout: 8}}
  digits:
    kind: tokenize
    source: {{modality: image, uri: ./data, channels: 1, size: 8}}
    tokenizer: ${{tok.tokenizer}}
  train:
    kind: train
    data: [{{store: "${{digits.store}}"}}]
    model: {{preset: tiny, paradigm: next_scale}}
    deepspeed: {{zero_stage: 2, precision: fp32}}
    optimizer: {{warmup_steps: 5}}
    workers: {workers}
    global_batch: {batch}
    steps: {steps}
    checkpoint_every: 1000
"""


def stage_tokens_per_s(folder: Path) -> float:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    exp = client.get_experiment_by_name("trainbench")
    [run] = client.search_runs([exp.experiment_id], filter_string="tags.`arpipe.stage` = 'train' and "
                                                                  "tags.`arpipe.cache` = 'miss'")
    history = sorted(client.get_metric_history(run.info.run_id, "tokens_per_s"), key=lambda m: m.step)
    return statistics.median(m.value for m in history if m.step > WARMUP)


def plain_loop(folder: Path) -> float:
    """The same model, batch and optimizer in a bare PyTorch loop, one thread."""
    import torch

    from arpipe.stages.models import ModelConfig, Transformer, load_config
    from arpipe.stages.store import DistributedSampler
    from arpipe.stages.train.data import Documents, build_vocab, summarize_store
    from arpipe.stages.train.loop import _units

    torch.set_num_threads(1)
    model_dir = next(folder.glob("runs/train/*/model"))
    config: ModelConfig = load_config(model_dir)
    store_uri = str(next(folder.glob("runs/digits/*/store")))
    summaries = [summarize_store(store_uri)]
    vocab, names = build_vocab(summaries)
    from arpipe.stages.store import TokenStore

    store = TokenStore.open(store_uri)
    docs = Documents(store, summaries, names, vocab, paradigm=config.paradigm, block_size=config.block_size,
                     n_axes=config.rope_axes, seq_len=config.max_seq_len)
    units = _units(DistributedSampler(store, seed=0, tail="wrap"))
    torch.manual_seed(0)
    model = Transformer(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.05)
    rates = []
    for step in range(STEPS):
        start = time.perf_counter()
        batch = docs.rows([next(units) for _ in range(BATCH)])
        _logits, loss = model(**batch.as_kwargs())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens = int((batch.target_ids != -100).sum())
        if step >= WARMUP:
            rates.append(tokens / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    from realdata import digits_folder

    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folders = {}
        for workers in (1, 2):
            folder = Path(tmp) / f"w{workers}"
            digits_folder(folder / "data", count=600)
            (folder / "pipeline.yaml").write_text(PIPELINE.format(workers=workers, batch=BATCH, steps=STEPS))
            proc = subprocess.run([sys.executable, "-m", "arpipe.pipeline.cli", "run", "pipeline.yaml"], cwd=folder,
                                  capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(proc.stdout + proc.stderr)
            results[f"stage_{workers}_worker_tokens_per_s"] = stage_tokens_per_s(folder)
            folders[workers] = folder
        results["plain_loop_tokens_per_s"] = plain_loop(folders[1])
    ratios = {"stage_1_worker_over_plain": results["stage_1_worker_tokens_per_s"] / results["plain_loop_tokens_per_s"],
              "2_workers_over_1": results["stage_2_worker_tokens_per_s"] / results["stage_1_worker_tokens_per_s"]}
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "train.json").write_text(json.dumps({"results": results, "ratios": ratios}, indent=1))
    for key, value in results.items():
        print(f"{key:<36} {value:12.0f}")
    print(f"train stage 1 worker / plain PyTorch loop: {ratios['stage_1_worker_over_plain']:.2f} (goal >= 0.85)")
    print(f"train stage 2 workers / 1 worker: {ratios['2_workers_over_1']:.2f} (report)")


if __name__ == "__main__":
    main()
