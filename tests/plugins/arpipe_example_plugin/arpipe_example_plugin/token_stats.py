"""Stage kind ``token_stats``: token frequencies of a store, counted shard by shard (the resumable unit)."""

from __future__ import annotations

import json

from arpipe.pipeline.stage import Output, Stage
from arpipe_example_plugin.schemas import TokenStatsStage as TokenStatsSpec


class TokenStatsStage(Stage):
    kind = "token_stats"
    version = "1"          # bump it when the same config would now produce different outputs
    spec: TokenStatsSpec

    def run(self) -> dict[str, Output]:
        import numpy as np

        from arpipe.stages.store import TokenStore

        store = TokenStore.open(self.spec.store)
        units = self.ctx.work_dir / ".arpipe" / "units"
        units.mkdir(parents=True, exist_ok=True)
        counts = np.zeros(store.vocab_size, dtype=np.int64)
        for shard, start, size in zip(store.shard_names, store.shard_starts, store.shard_sizes):
            done = units / f"{shard}.npy"
            if not done.exists():          # a rerun after a crash skips the shards already counted
                shard_counts = np.zeros(store.vocab_size, dtype=np.int64)
                for i in range(int(start), int(start + size)):
                    shard_counts += np.bincount(store.tokens(i).ravel(), minlength=store.vocab_size)
                partial = units / f"{shard}.tmp.npy"
                np.save(partial, shard_counts)
                partial.rename(done)       # a unit is whole or absent, never half-written
            counts += np.load(done)
        top = np.argsort(-counts, kind="stable")[: self.spec.top]
        stats = {"tokens": int(counts.sum()), "distinct": int((counts > 0).sum()),
                 "top": {str(t): int(counts[t]) for t in top}}
        (self.ctx.work_dir / "stats.json").write_text(json.dumps(stats, indent=1))
        self.ctx.log_metrics({"tokens": stats["tokens"], "distinct": stats["distinct"]})
        return {"stats": Output(path="stats.json")}
