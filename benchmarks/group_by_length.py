"""``group_by_length: true`` against rows padded to seq_len: training throughput on a store of mixed lengths.

The store is real: scikit-learn's 1,797 digits upsampled (bilinear) to 16x16 (even indices) and 32x32 (odd
ones), tokenized by a ``flexvq`` tokenizer (patch 4x4, scales 1, 2, 3, 4, 6, 8, sizes 16, 24 and 32,
codebook 256, fitted on 750 digits of each trained size), so half the documents are 30 tokens and half 130,
written to a token store in a scratch folder with the metadata the tokenize stage writes. Both sides train
the same tiny next_scale Transformer (2 layers, 4 heads, 64 wide, 3 rope axes, FlexVAR's accumulated input)
from the same seed, in one process on CPU (``--threads`` torch threads), for ``--steps`` steps of
``--batch`` documents with AdamW, wired as the train stage wires them (``stages/train/loop.py``): units from
``DistributedSampler(order, tail="wrap")`` (one rank), rows from ``Documents.rows``. Padded: the plain
shuffled order, every row padded to seq_len. Grouped: ``LengthGroupedOrder`` over Hugging Face's megabatches
(``megabatch_size``), each micro-batch padded to its longest document. A step's time is the loop's: rows
built, forward, backward, optimizer step. The two runs alternate ``--repeats`` times; the best of each is
kept. Reported: wall time, samples/s, real (non-padding) positions/s and the share of positions that are
padding. The ratio line comes last; results also go to ``benchmarks/results/group_by_length.json``.

    .venv/bin/python benchmarks/group_by_length.py [--steps 60] [--batch 32] [--repeats 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from a checkout

from arpipe.stages.modalities import make_tokenizer  # noqa: E402
from arpipe.stages.models import ModelConfig, Transformer  # noqa: E402
from arpipe.stages.store import (  # noqa: E402
    DistributedSampler,
    LengthGroupedOrder,
    StoreWriter,
    TokenStore,
    megabatch_size,
)
from arpipe.stages.store.sampler import order_for  # noqa: E402
from arpipe.stages.train.data import (  # noqa: E402
    Documents,
    build_vocab,
    default_seq_len,
    scale_inputs,
    summarize_store,
)

SCALES = [1, 2, 3, 4, 6, 8]
SIZES = (16, 24, 32)
TRAINED_SIZES = (16, 32)


def write_store(folder: Path) -> str:
    """The digits at 16x16 and 32x32 (alternating) as flexvq tokens in a token store; its uri."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x8 = torch.from_numpy(digits.images[:, None].astype(np.float32) / 16)
    x = {n: F.interpolate(x8, size=(n, n), mode="bilinear", align_corners=False).clamp(0, 1).numpy()
         for n in TRAINED_SIZES}
    tok = make_tokenizer("flexvq", patch=[4, 4], scales=SCALES, sizes=list(SIZES), channels=1, codebook_size=256,
                         fit_iters=60).fit(list(x[16][:750]) + list(x[32][750:1500]))
    tokenizer_uri, uri = str(folder / "tokenizer"), str(folder / "store")
    tok.save(tokenizer_uri)
    images = [x[TRAINED_SIZES[i % 2]][i] for i in range(len(x8))]
    tokens = tok.encode_arrays(images)
    with StoreWriter(uri, vocab_size=tok.vocab_size, samples_per_shard=256,
                     metadata={"modality": "image", "tokenizer_uri": tokenizer_uri,
                               "tokenizer_layout": tok.layout()}) as w:
        for i, (codes, label) in enumerate(zip(tokens, digits.target)):
            w.append(codes, key=f"digit{i}", modality="image", condition=str(label))
    return uri


def endless(sampler: DistributedSampler):
    """The loop's stream of units: after a full pass the sampler moves itself to the next epoch."""
    while True:
        yield from sampler


def train(uri: str, grouped: bool, args) -> dict:
    """``args.steps`` training steps as the train stage takes them; times, positions and losses."""
    store = TokenStore.open(uri)
    summaries = [summarize_store(uri)]
    vocab, names = build_vocab(summaries)
    inputs = scale_inputs(summaries, names, vocab)
    seq_len = default_seq_len(summaries, vocab)
    config = ModelConfig(vocab_size=vocab.vocab_size, n_layer=2, n_head=4, n_embd=64, rope_axes=3,
                         paradigm="next_scale", max_seq_len=seq_len,
                         feature_dim=max(si.feature_dim for si in inputs.values()))
    docs = Documents(store, summaries, names, vocab, paradigm=config.paradigm, block_size=config.block_size,
                     n_axes=config.rope_axes, seq_len=seq_len, scale_inputs=inputs, group_by_length=grouped)
    order = order_for(store, seed=0)
    if grouped:
        order = LengthGroupedOrder(order, docs.lengths(), megabatch_size(len(order), args.batch))
    sampler = DistributedSampler(order, rank=0, world_size=1, seed=0, tail="wrap")
    torch.manual_seed(0)
    model = Transformer(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    units = endless(sampler)
    rows_s, positions, real, losses = 0.0, 0, 0, []
    started = time.perf_counter()
    for _ in range(args.steps):
        t0 = time.perf_counter()
        rows = docs.rows([next(units) for _ in range(args.batch)])
        rows_s += time.perf_counter() - t0
        _logits, loss = model(**rows.as_kwargs())
        opt.zero_grad()
        loss.backward()
        opt.step()
        positions += rows.input_ids.numel()
        real += int((rows.doc_ids >= 0).sum())
        losses.append(loss.item())
    seconds = time.perf_counter() - started
    samples = args.steps * args.batch
    return {"seconds": seconds, "rows_seconds": rows_s, "samples_per_s": samples / seconds,
            "real_positions_per_s": real / seconds, "padding_share": 1 - real / positions,
            "mean_row_width": positions / samples, "seq_len": seq_len, "mean_loss": float(np.mean(losses))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="arpipe-group-by-length-") as folder:
        t0 = time.perf_counter()
        uri = write_store(Path(folder))
        built = time.perf_counter() - t0
        lengths = TokenStore.open(uri).lengths()
        best: dict[str, dict] = {}
        for _ in range(args.repeats):   # alternating, so a neighbour's load falls on both
            for name, grouped in (("padded", False), ("grouped", True)):
                run = train(uri, grouped, args)
                if name not in best or run["seconds"] < best[name]["seconds"]:
                    best[name] = run
    padded, grouped = best["padded"], best["grouped"]
    ratio = grouped["samples_per_s"] / padded["samples_per_s"]
    print(f"store: {len(lengths)} digits, tokens per document {sorted(set(lengths.tolist()))} "
          f"(built in {built:.0f} s); {args.steps} steps of {args.batch}, {args.threads} threads, "
          f"best of {args.repeats}; seq_len {padded['seq_len']}")
    columns = [("seconds", "wall time s", ".2f"), ("rows_seconds", "  of which units and rows s", ".2f"),
               ("samples_per_s", "samples/s", ".1f"), ("real_positions_per_s", "real (non-pad) positions/s", ".0f"),
               ("padding_share", "padding share of positions", ".3f"), ("mean_row_width", "mean row width", ".1f"),
               ("mean_loss", "mean loss", ".4f")]
    print(f"{'':30s} {'padded':>12s} {'grouped':>12s}")
    for key, title, fmt in columns:
        print(f"{title:30s} {padded[key]:>12{fmt}} {grouped[key]:>12{fmt}}")
    out = ROOT / "benchmarks" / "results" / "group_by_length.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": {"padded": padded, "grouped": grouped},
                               "ratios": {"group_by_length / padded samples/s": ratio}}, indent=2))
    print(f"group_by_length / padded to seq_len: {ratio:.2f}x samples/s")


if __name__ == "__main__":
    main()
