#!/usr/bin/env bash
# The GPU path in one short run (issue 22), for a machine with one NVIDIA GPU and the project set up with a
# CUDA build of torch (`make setup TORCH=torch==2.13.0` where the index serves CUDA wheels). Under 8 minutes:
#   1. what the machine is (nvidia-smi, torch's CUDA build, bf16 support);
#   2. the attention kernels on CUDA: tests/test_attention_kernels.py runs its CUDA cases (flex, sdpa and dense
#      logits and gradients within 1e-5 for every paradigm, packed or not) and tests/test_compile.py;
#   3. tokenizing on the GPU (~1 minute): tests/test_tokenize_gpu.py runs its CUDA cases (patch_vq, msvq and vqvae
#      encode on cuda as on the CPU, up to near-ties; a tokenize stage with resources.num_gpus on Ray GPU tasks);
#   4. a train stage of the `small` preset (~100M parameters) on 1 GPU: ZeRO-2, bf16, 100 steps of 16 packed
#      sequences of 2048 tokens (scikit-learn's digits, tokenized first), with NCCL through Ray Train;
#      prints tokens/s and MFU (the train stage's own metrics, median over steps 20-100, from MLflow).
# Usage: benchmarks/gpu_check.sh [WORK_DIR]   (from the checkout; the work folder is kept for a look afterwards)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WORK=${1:-$(mktemp -d /tmp/arpipe-gpu-check-XXXX)}
mkdir -p "$WORK"
export RAY_AUTH_MODE=disabled

echo "== 1. the machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" - <<'EOF'
import torch
assert torch.cuda.is_available(), "torch sees no CUDA device: install a CUDA build of torch (see this script's header)"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}, "
      f"bf16 {torch.cuda.is_bf16_supported()}")
EOF

echo "== 2. attention kernels and compile on CUDA"
timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_attention_kernels.py tests/test_compile.py -rs

echo "== 3. tokenizers and a tokenize stage on CUDA"
timeout 180 "$PY" -m pytest -q -p no:cacheprovider tests/test_tokenize_gpu.py -rs

echo "== 4. small preset, 1 GPU, ZeRO-2, bf16, 100 steps"
cp examples/s3_storage_steps.py "$WORK/"
cat > "$WORK/gpu.yaml" <<'EOF'
name: gpu-check
storage: ./arpipe-runs
stages:
  data:
    kind: python
    callable: s3_storage_steps:export_digits
  tokenizer:
    kind: tokenizer
    source: {modality: image, uri: "${data.images}", channels: 1, labels: labels.npy}
    tokenizer: {type: patch_vq, patch: [1, 1], codebook_size: 16}
    fit: {max_samples: 1024, heldout: 64}
  digits:
    kind: tokenize
    source: {modality: image, uri: "${data.images}", channels: 1, labels: labels.npy, rows_per_unit: 512}
    tokenizer: ${tokenizer.tokenizer}
  train:
    kind: train
    data: [{store: "${digits.store}"}]
    model: {preset: small, paradigm: next_token, attention: auto}
    deepspeed: {zero_stage: 2, precision: bf16}
    optimizer: {lr: 0.0003, warmup_steps: 10}
    use_gpu: true
    packing: true
    seq_len: 2048
    global_batch: 16
    steps: 100
    checkpoint_every: 100
    log_every: 1
EOF
(cd "$WORK" && timeout 360 "$OLDPWD/.venv/bin/arpipe" run gpu.yaml)
"$PY" - "$WORK" <<'EOF'
import statistics
import sys

from mlflow.tracking import MlflowClient

client = MlflowClient(f"sqlite:///{sys.argv[1]}/mlflow.db")
exp = client.get_experiment_by_name("gpu-check")
[run, *_] = client.search_runs([exp.experiment_id], filter_string="tags.`arpipe.stage` = 'train'",
                               order_by=["attributes.start_time DESC"])
rows = {k: [m.value for m in client.get_metric_history(run.info.run_id, k) if m.step >= 20]
        for k in ("tokens_per_s", "mfu", "loss")}
print(f"small preset, 1 GPU, ZeRO-2 bf16: {statistics.median(rows['tokens_per_s']):,.0f} tokens/s, "
      f"MFU {100 * statistics.median(rows['mfu']):.1f}% (median over steps 20-100), last loss {rows['loss'][-1]:.3f}")
EOF
