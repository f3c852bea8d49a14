"""Evaluation as a map over units of samples on Ray actors and a reduce of their statistics: a user who scores
more samples, or on more actors, gets the same metrics, from a driver whose memory does not grow."""

from __future__ import annotations

import json
import math
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import committed_output as out
from test_sample_evaluate import build_project

from arpipe.pipeline.stage import StageContext
from arpipe.schemas.sample import EvaluateStage as EvaluateSpec
from arpipe.stages.evaluate import EvaluateStage
from arpipe.stages.evaluation import FeatureExtractor, Moments, frechet_from_features, gaussian_stats

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")

BUILT_IN_BACKGROUND = {"digits-project": build_project}


@pytest.fixture(scope="module")
def project(background):
    return background.result("digits-project")


def evaluate(project: Path, folder: Path, **config) -> dict:
    """The evaluate stage in this process (the driver), its actors on the session's Ray: the 1,200 training
    digits as the set scored against the 200 held-out ones, with the project's feature network, judge and model."""
    spec = EvaluateSpec.model_validate({
        "kind": "evaluate", "samples": str(out(project, "digits") / "store"),
        "reference": str(out(project, "heldout") / "store"), "model": str(out(project, "train") / "model"),
        "features": {"image": str(project / "features.pt"), "image_size": 16},
        "classifier": {"image": str(out(project, "judge") / "classifier.skops"), "image_size": 8}, **config})
    folder.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(name="evaluate", kind="evaluate", fingerprint="sharded", out_uri=str(folder),
                       work_dir=folder, pipeline_dir=project)
    EvaluateStage(spec, ctx).run()
    return json.loads((folder / "metrics" / "metrics.json").read_text())["metrics"]


def rows(folder: Path) -> list[tuple]:
    table = pq.read_table(folder / "metrics" / "scores.parquet").to_pylist()
    return sorted((r["set"], r["key"], r["metric"], r["value"]) for r in table)


def test_moments_merged_over_shards_equal_the_statistics_of_the_stacked_features():
    rng = np.random.default_rng(0)
    # features far from the origin: raw sums of x x^T would lose the covariance to cancellation
    real, fake = rng.normal(100.0, 1.0, (1000, 48)), rng.normal(100.2, 1.1, (700, 48))
    cuts = np.sort(rng.choice(np.arange(1, 1000), 12, replace=False))
    merged = Moments.of(real[:0])
    for part in np.split(real, cuts):
        merged = merged.merge(Moments.of(part))
    mean, cov = merged.gaussian()
    want_mean, want_cov = gaussian_stats(real)
    assert merged.n == 1000
    np.testing.assert_allclose(mean, want_mean, rtol=1e-12)
    np.testing.assert_allclose(cov, want_cov, rtol=1e-9, atol=1e-12)
    from arpipe.stages.evaluation import frechet_distance

    fid = frechet_distance(mean, cov, *Moments.of(fake).gaussian())
    assert fid == pytest.approx(frechet_from_features(real, fake), rel=1e-9)
    assert fid > 0.04   # 0.2 apart in each of 48 dimensions: the distance sees it
    with pytest.raises(ValueError, match="feature sizes differ"):
        merged.merge(Moments.of(fake[:, :3]))


def test_two_actors_and_small_units_score_what_one_unit_in_one_process_scores(project, ray_cluster, tmp_path):
    """200 samples spread over the 1,200 digits in 13 units on 2 actors against all 200 held-out digits in
    one unit per set on 1 actor: every summary metric and every per-sample score agree to 1e-9; FID equals the
    Fréchet distance of the features stacked in this process; a crash costs only the units it lost."""
    sharded = evaluate(project, tmp_path / "sharded", max_samples=200, samples_per_unit=16, actors=2)
    single = evaluate(project, tmp_path / "single", max_samples=200, samples_per_unit=1000, actors=1)
    assert set(sharded) == set(single) and {"image/fid", "image/kid", "image/cas", "heldout/bits_per_token",
                                             "image/precision", "image/intensity_mean_gap"} <= set(sharded)
    for name, value in single.items():
        assert sharded[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name
    a, b = rows(tmp_path / "sharded"), rows(tmp_path / "single")
    assert len(a) == len(b) == 200 * 2 + 2 * 200 * 3   # NLL and bits per held-out sample, 3 scores a sample per set
    for x, y in zip(a, b, strict=True):
        assert x[:3] == y[:3] and x[3] == pytest.approx(y[3], rel=1e-9, abs=1e-12)
    assert sharded["image/cas_reference"] > 0.8   # the judge reads real digits: the units fed it real images

    # the same FID from every feature in one array, computed here
    from arpipe.stages.evaluate import spread_indices
    from arpipe.stages.modalities import load_tokenizer
    from arpipe.stages.store import TokenStore

    def features(store_uri: str, indices: list[int]) -> np.ndarray:
        store = TokenStore.open(store_uri)
        tok = load_tokenizer(store.manifest.metadata["tokenizer_uri"])
        images = [np.clip(x, 0, 1) for x in tok.decode_arrays([store[i].tokens.reshape(-1) for i in indices])]
        net = FeatureExtractor.load(str(project / "features.pt"), kind="image", input_size=16)
        return net.features(np.stack(images).astype(np.float32))

    fake = features(str(out(project, "digits") / "store"), spread_indices(1200, 200))
    real = features(str(out(project, "heldout") / "store"), list(range(200)))
    assert sharded["image/fid"] == pytest.approx(frechet_from_features(real, fake), rel=1e-9)

    units = sorted((tmp_path / "sharded" / ".arpipe" / "units").glob("*.json"))
    assert len(units) == math.ceil(200 / 16) * 3   # score units of each set, NLL units of the held-out store
    before = (tmp_path / "sharded" / "metrics" / "metrics.json").read_bytes()
    units[0].unlink()
    units[-1].unlink()
    assert evaluate(project, tmp_path / "sharded", max_samples=200, samples_per_unit=16, actors=2) == sharded
    assert (tmp_path / "sharded" / "metrics" / "metrics.json").read_bytes() == before


def test_the_drivers_memory_does_not_grow_with_the_number_of_samples(project, ray_cluster, tmp_path):
    """Peak memory the driver allocates (Python and numpy, traced) while scoring 200 vs 800 samples: the samples
    stay on the actors and in the units; only a bounded subset is kept for the pairwise metrics. (Evaluating in
    one process, as arpipe did before, measured 1.50x.)"""
    def peak(n: int) -> int:
        tracemalloc.start()
        try:
            evaluate(project, tmp_path / f"n{n}", max_samples=n, pairwise_samples=40, samples_per_unit=200,
                     actors=1)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    peak(50)   # imports and first loads, not counted
    small, large = peak(200), peak(800)
    print(f"driver peak traced memory: {small / 1e6:.2f} MB at 200 samples, {large / 1e6:.2f} MB at 800")
    assert large <= 1.2 * small
