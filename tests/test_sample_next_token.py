"""Sampling a next-token model through `arpipe run`: speculative Jacobi decoding draws what plain decoding draws
in fewer forward passes, and a model kept in a bucket samples into S3 storage, then is cached."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import arpipe, stage_lines, write
from helpers import committed_output as out


@pytest.fixture(scope="module")
def next_token_model(tmp_path_factory, single_torch_thread):
    from realdata import digits_model_folder

    return digits_model_folder(tmp_path_factory.mktemp("next_token"), paradigm="next_token", steps=200)


def test_speculative_jacobi_sampling_matches_plain_in_fewer_passes(next_token_model, tmp_path, ray_cluster):
    from scipy.stats import chi2_contingency

    from arpipe.stages.store import TokenStore

    write(tmp_path, {"sjd.yaml": f"""
        name: sjd
        storage: ./runs
        stages:
          plain: {{kind: sample, model: {next_token_model}, num_samples: 64, batch_size: 32, media: {{}}}}
          sjd: {{kind: sample, model: {next_token_model}, num_samples: 64, batch_size: 32, media: {{}},
                decoder: sjd, sjd_window: 16, seed: 1}}
          lantern_k1: {{kind: sample, model: {next_token_model}, num_samples: 64, batch_size: 32, media: {{}},
                       decoder: sjd, sjd_window: 16, seed: 1, relaxed: {{k: 1, delta: 0.3}}}}
        """})
    arpipe("run", "sjd.yaml", cwd=tmp_path, env={"RAY_ADDRESS": ray_cluster}, check=True)
    tokens = {s: np.stack([x.tokens.reshape(-1) for x in TokenStore.open(str(out(tmp_path, s) / "samples"))])
              for s in ("plain", "sjd", "lantern_k1")}
    assert tokens["plain"].shape == tokens["sjd"].shape == (64, 64)
    assert np.array_equal(tokens["lantern_k1"], tokens["sjd"])   # LANTERN with k 1 is SJD, sample for sample
    table = np.stack([np.bincount(tokens[s].ravel(), minlength=4) for s in ("plain", "sjd")])
    assert chi2_contingency(table[:, table.sum(0) > 0]).pvalue > 0.01
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("sjd")
    passes = {r.data.tags["arpipe.stage"]: r.data.metrics["forward_passes"]
              for r in client.search_runs([exp.experiment_id], filter_string="tags.`arpipe.kind` = 'sample'")}
    assert passes["plain"] == 2 * 64   # two batches, one pass per token
    assert passes["sjd"] < 0.67 * passes["plain"], passes


@pytest.mark.full   # S3 in and out: make test runs it through tokenize (tests/test_tokenize_stages.py) and a whole pipeline (tests/test_pipeline_s3.py)
def test_sampling_a_model_on_s3_into_s3_storage(next_token_model, tmp_path, ray_cluster, s3_bucket):
    from arpipe.pipeline.storage import join, storage_for
    from arpipe.stages.store import TokenStore

    storage = storage_for(s3_bucket)
    model_uri = join(s3_bucket, "models", "digits")
    for path in next_token_model.iterdir():
        storage.put_file(path, join(model_uri, path.name))
    write(tmp_path, {"s3.yaml": f"""
        name: s3sample
        storage: {s3_bucket}/runs
        stages:
          sample: {{kind: sample, model: {model_uri}, num_samples: 12, samples_per_shard: 8, batch_size: 8}}
        """})
    env = {"RAY_ADDRESS": ray_cluster, "ARPIPE_STAGING": str(tmp_path / "staging")}
    arpipe("run", "s3.yaml", cwd=tmp_path, env=env, check=True)
    [record] = [e.relpath for e in storage.list(join(s3_bucket, "runs")) if e.relpath.endswith("outputs.json")]
    out_uri = join(s3_bucket, "runs", record.rsplit("/", 1)[0])
    files = json.loads(storage.read_text(join(out_uri, "outputs.json")))["files"]
    assert len([f for f in files if f.startswith("media/image/") and f.endswith(".png")]) == 12
    assert "media/contact_image.png" in files
    store = TokenStore.open(join(out_uri, "samples"))
    assert len(store) == 12 and [s.condition for s in store] == [str(i % 10) for i in range(12)]
    again = arpipe("run", "s3.yaml", cwd=tmp_path, env=env, check=True)
    assert stage_lines(again.stdout) == {"sample": ["cached"]}
