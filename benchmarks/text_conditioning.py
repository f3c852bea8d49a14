"""Text-conditioned against class-conditioned training on the same images (issue 17), side by side in one run.

The captioned digits (examples/captioned_digits_steps.py, 600 images) tokenized twice by one msvq tokenizer:
once with their class labels (folder names), once with their captions' text tokens and no labels. Two train
stages of the same model, batch, steps and worker (1 Ray Train worker, ZeRO-2, fp32, CPU) run on them. The
throughput is the median of the per-step `tokens_per_s` each logs to MLflow after warm-up: target (image)
tokens per second, the same 85 per image in both, so the ratio is images per second too. The text model's
documents are longer by the caption positions (no loss is taken there): the ratio says what the prefix costs.
Prints the ratio last (goal >= 0.85); writes benchmarks/results/text_conditioning.json.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS, WARMUP, BATCH = 40, 10, 32
PIPELINE = """
name: textbench
storage: ./runs
stages:
  data:
    kind: python
    callable: captioned_digits_steps:export_captioned
    config: {{count: 600}}
  tok:
    kind: tokenizer
    source: {{modality: image, uri: "${{data.images}}", channels: 1, size: 8}}
    tokenizer: {{type: msvq, scales: [1, 2, 4, 8], codebook_size: 64}}
    fit: {{max_samples: 300, heldout: 8}}
  text:
    kind: tokenizer
    source: {{modality: image, uri: "${{data.images}}", channels: 1, size: 8, captions: auto}}
    tokenizer: {{type: text, vocab_size: 320}}
  classes:
    kind: tokenize
    source: {{modality: image, uri: "${{data.images}}", channels: 1, size: 8}}
    tokenizer: ${{tok.tokenizer}}
  captions:
    kind: tokenize
    source: {{modality: image, uri: "${{data.images}}", channels: 1, size: 8, labels: null, captions: auto,
             captions_required: true}}
    tokenizer: ${{tok.tokenizer}}
    text_tokenizer: ${{text.tokenizer}}
""" + "".join(f"""
  train_{store}:
    kind: train
    data: [{{{{store: "${{{{{store}.store}}}}"}}}}]
    model: {{{{preset: tiny, paradigm: next_scale}}}}
    deepspeed: {{{{zero_stage: 2, precision: fp32}}}}
    optimizer: {{{{warmup_steps: 5}}}}
    global_batch: {{batch}}
    steps: {{steps}}
    checkpoint_every: 1000
""" for store in ("classes", "captions"))


def stage_tokens_per_s(folder: Path, stage: str) -> float:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    exp = client.get_experiment_by_name("textbench")
    [run] = client.search_runs([exp.experiment_id], filter_string=f"tags.`arpipe.stage` = '{stage}'")
    history = sorted(client.get_metric_history(run.info.run_id, "tokens_per_s"), key=lambda m: m.step)
    return statistics.median(m.value for m in history if m.step > WARMUP)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shutil.copyfile(ROOT / "examples" / "captioned_digits_steps.py", folder / "captioned_digits_steps.py")
        (folder / "pipeline.yaml").write_text(PIPELINE.format(batch=BATCH, steps=STEPS))
        # one train stage at a time, so that neither shares the two cores with the other
        for only in ("data,tok,text,classes,captions,train_classes", "train_captions"):
            proc = subprocess.run([sys.executable, "-m", "arpipe.pipeline.cli", "run", "pipeline.yaml", "--only",
                                   only], cwd=folder, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(proc.stdout + proc.stderr)
        vocab = json.loads(next(folder.glob("runs/train_captions/*/model/vocab.json")).read_text())
        results = {"class_tokens_per_s": stage_tokens_per_s(folder, "train_classes"),
                   "text_tokens_per_s": stage_tokens_per_s(folder, "train_captions"),
                   "caption_positions": float(vocab["prompts"][0][2])}
    ratios = {"text_over_class (goal >= 0.85)": results["text_tokens_per_s"] / results["class_tokens_per_s"]}
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "text_conditioning.json").write_text(json.dumps({"results": results, "ratios": ratios}, indent=1))
    for key, value in results.items():
        print(f"{key:<28} {value:12.0f}")
    print(f"text-conditioned / class-conditioned training throughput, same images: "
          f"{ratios['text_over_class (goal >= 0.85)']:.2f} (goal >= 0.85)")


if __name__ == "__main__":
    main()
