"""Tokenizing on GPU actors: `resources: {num_gpus: ...}` on a tokenize stage encodes its units on Ray actors
that each hold that share of a GPU, their tokenizer on cuda; CPU tasks stay the default and encode bit for bit
as before.

The CUDA cases run where torch sees a GPU (benchmarks/gpu_check.sh runs this file there). On a CPU-only
machine they are skipped, and instead: the one-line refusal of a GPU request no node can meet, and the actor
path on a Ray node that declares a GPU torch cannot see.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import arpipe, stage_lines, start_in_own_session, write
from realdata import digits_folder

from arpipe.schemas.tokenize import TokenizeStage as TokenizeSpec
from arpipe.stages.modalities import TokenizerError, load_tokenizer, make_tokenizer, open_reader
from arpipe.stages.store import TokenStore
from arpipe.stages.tokenize import _tokenizer, unit_device, unit_ray_options

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh)")

#: one small artifact of each tokenizer type that can run on a GPU (the fixture adds a codec one, which cannot)
TOKENIZERS = {
    "patch_vq": ({"input_shape": [1, 8, 8], "patch": [2, 2], "codebook_size": 32, "fit_iters": 20}, {}),
    "msvq": ({"input_shape": [1, 8, 8], "patch": [1, 1], "scales": [1, 2, 4, 8], "codebook_size": 32,
              "fit_iters": 20}, {}),
    "vqvae": ({"input_shape": [1, 8, 8], "downsample": 2, "codebook_size": 16, "hidden": 8, "code_dim": 4,
               "device": "cpu"}, {"steps": 20, "batch_size": 16}),
}

STAGE = """
  {name}:
    kind: tokenize
    source: {{modality: image, uri: {data}, channels: 1, files_per_unit: {files_per_unit}}}
    tokenizer: {tokenizer}
    resources: {resources}
"""

#: a Ray instance that declares one GPU whether or not the machine has one: Ray places GPU tasks and actors
#: on it, torch in them sees what the machine has
ONE_GPU_HEAD = textwrap.dedent("""
    import sys
    import ray

    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})
    print(ray.get_runtime_context().gcs_address, flush=True)
    sys.stdin.read()   # held until the test closes this pipe
    ray.shutdown()
""")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> dict:
    """40 digits, their arrays as the image reader gives them, and a fitted artifact of each tokenizer type."""
    root = tmp_path_factory.mktemp("gpu-tokenize")
    data = digits_folder(root / "digits", count=40)
    reader = open_reader("image", str(data), channels=1)
    samples = [s for unit in reader.units() for s in reader.read(unit)]
    arrays = {s.key: s.data for s in samples}
    artifacts = {}
    for kind, (config, fit) in TOKENIZERS.items():
        tok = make_tokenizer(kind, **config).fit(list(arrays.values()), **fit)
        artifacts[kind] = str(root / "artifacts" / kind)
        tok.save(artifacts[kind])
    codec = str(root / "artifacts" / "codec")   # JPEG bytes: nothing to run on a GPU
    make_tokenizer("codec", input_shape=[1, 8, 8]).fit(list(arrays.values())[:4]).save(codec)
    return {"root": root, "data": data, "arrays": arrays, "artifacts": artifacts, "codec": codec}


@pytest.fixture
def one_gpu_ray(tmp_path):
    """The GCS address of a Ray instance of this test's own whose one node declares one GPU."""
    log = open(tmp_path / "one-gpu-head.log", "w")
    head = start_in_own_session([sys.executable, "-c", ONE_GPU_HEAD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=log, text=True)
    address = head.stdout.readline().strip()
    if not address:
        head.kill()
        pytest.fail(f"the one-GPU Ray instance did not start; see {log.name}")
    yield address
    head.stdin.close()
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        head.kill()
    log.close()


def pipeline(project: dict, folder: Path, stages: dict[str, str], resources: str = "{}",
             files_per_unit: int = 64) -> Path:
    """A tokenize stage per ``stages`` item (name -> tokenizer artifact) on the digits, with ``resources``."""
    body = "".join(STAGE.format(name=name, data=project["data"], tokenizer=uri, resources=resources,
                                files_per_unit=files_per_unit) for name, uri in stages.items())
    return write(folder, {"pipeline.yaml": f"name: gpu-tokenize\nstorage: ./runs\nstages:{body}"})


def store_tokens(folder: Path, stage: str) -> dict[str, np.ndarray]:
    store = TokenStore.open(str(next(folder.glob(f"runs/{stage}/*/store"))))
    return {store[i].key: store.tokens(i).reshape(-1).astype(np.int64) for i in range(len(store))}


def encoded(uri: str, arrays: dict[str, np.ndarray], device: str | None = None) -> dict[str, np.ndarray]:
    tok = load_tokenizer(uri) if device is None else load_tokenizer(uri, device=device)
    return dict(zip(arrays, tok.encode_arrays(list(arrays.values())), strict=True))


# ----------------------------------------------------------------------------- CPU: the default, unchanged


def test_config_selects_the_units_resources_and_device():
    """One CPU and no GPU per unit by default, on plain tasks; `resources` reaches what encodes the units, and a
    GPU share puts them on actors (restarted, not retried as tasks) whose tokenizer runs on cuda."""
    base = {"kind": "tokenize", "source": {"modality": "image", "uri": "./digits"}, "tokenizer": "./tok"}
    default = TokenizeSpec.model_validate(base)
    assert unit_ray_options(default.resources) == {"num_cpus": 1.0, "num_gpus": 0.0, "max_retries": 2}
    assert unit_device(default.resources) == "cpu"
    gpu = TokenizeSpec.model_validate({**base, "resources": {"num_gpus": 0.5, "num_cpus": 2, "memory": 1 << 30}})
    assert unit_ray_options(gpu.resources) == {"num_cpus": 2.0, "num_gpus": 0.5, "memory": 1 << 30,
                                               "max_restarts": 1, "max_task_retries": 1}
    assert unit_device(gpu.resources) == "cuda"


def test_unit_tokenizers_load_on_the_device_asked_for(project):
    """A unit's patch_vq, msvq and vqvae run where the job says (vqvae's own default, auto, is not used), and a
    tokenizer with nothing to run on a GPU (codec) takes no device and says nothing."""
    for kind, uri in project["artifacts"].items():
        doc = json.loads((Path(uri) / "tokenizer.json").read_text())
        tok = _tokenizer(uri, doc["digest"], "cpu")
        assert tok.device == torch.device("cpu"), kind
        assert "device" not in tok.config(), f"{kind}: the device must stay out of the artifact's digest"
        if not torch.cuda.is_available():   # the device does reach it: cuda is asked for, and refused here
            with pytest.raises(TokenizerError, match="CUDA is not available"):
                load_tokenizer(uri, device="cuda")
    codec = load_tokenizer(project["codec"], device="cuda")
    assert not hasattr(codec, "device")


def test_explicit_cpu_encodes_as_the_default_bit_for_bit(project):
    """A tokenizer loaded for the CPU encodes and decodes as one loaded as before, with no device (patch_vq and
    msvq: the CPU; vqvae: auto, which is the CPU where torch sees no GPU)."""
    arrays = project["arrays"]
    for kind, uri in project["artifacts"].items():
        if load_tokenizer(uri).device.type != "cpu":
            continue   # vqvae's auto on a GPU machine: test_cuda_encodes_as_the_cpu_does compares the two
        default, cpu = encoded(uri, arrays), encoded(uri, arrays, "cpu")
        assert all(default[k].dtype == cpu[k].dtype and default[k].tobytes() == cpu[k].tobytes() for k in arrays), kind
        tok = load_tokenizer(uri, device="cpu")
        tokens = list(cpu.values())[:8]
        assert all(a.tobytes() == b.tobytes() for a, b in zip(load_tokenizer(uri).decode_arrays(tokens),
                                                               tok.decode_arrays(tokens), strict=True)), kind


def test_tokenize_stage_on_cpu_stores_the_tokenizers_tokens(project, tmp_path, ray_cluster):
    """The stage's units (one CPU each, the default) store exactly what the tokenizer encodes in this process;
    a later GPU request is runtime-only: the store is reused, not redone."""
    art = project["artifacts"]
    folder = pipeline(project, tmp_path, {"msvq": art["msvq"], "vqvae": art["vqvae"]})
    run = arpipe("run", "pipeline.yaml", cwd=folder, env={"RAY_ADDRESS": ray_cluster}, check=True)
    assert all(states[-1] == "done" for states in stage_lines(run.stdout).values()), run.stdout
    assert " on cuda" not in run.stdout
    for stage in ("msvq", "vqvae"):
        stored, expected = store_tokens(folder, stage), encoded(project["artifacts"][stage], project["arrays"], "cpu")
        assert stored.keys() == expected.keys()
        assert all(np.array_equal(stored[k], expected[k]) for k in expected), stage
    plan = arpipe("plan", "pipeline.yaml", "--json", "-s", "stages.msvq.resources.num_gpus=1", cwd=folder, check=True)
    assert {row["stage"]: row["action"] for row in json.loads(plan.stdout)["stages"]}["msvq"] == "cached", plan.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the request is met")
def test_gpu_request_no_node_can_meet_fails_in_one_line(project, tmp_path, ray_cluster):
    """On a cluster without GPUs the stage does not wait for good: it says so, waits ARPIPE_GPU_WAIT_S for a GPU
    node to join (a cluster that publishes no autoscaler node groups), then fails in one line, exit 2. A codec
    tokenizer, with nothing to run on a GPU, is said to encode on the CPU while holding the GPU asked for."""
    folder = pipeline(project, tmp_path, {"msvq": project["artifacts"]["msvq"], "jpeg": project["codec"]},
                      resources="{num_gpus: 1}")
    run = arpipe("run", "pipeline.yaml", cwd=folder, env={"RAY_ADDRESS": ray_cluster, "ARPIPE_GPU_WAIT_S": "1"},
                 timeout=120)
    out = run.stdout + run.stderr
    assert run.returncode == 2, out
    for stage in ("msvq", "jpeg"):
        assert stage_lines(run.stdout)[stage][-1] == "failed", out
        assert f"[{stage}] 1 units from" in out and " on cuda, 1 GPU each" in out
        assert f"[{stage}] no Ray node has 1 GPU(s) yet: waiting up to 1 s for one to join" in out
        error = (f"stages.{stage}.resources.num_gpus: asks for 1 GPU(s) per task, but no node of the Ray cluster has "
                 "a GPU (none joined within 1 s); set it to 0 to run on CPUs")
        assert error in out
        assert not list(folder.glob(f"runs/{stage}/*/store/manifest.json"))
    assert "[jpeg] the codec tokenizer has nothing to run on a GPU: it encodes on the CPU" in out
    assert "[msvq] the msvq tokenizer" not in out
    assert "Traceback" not in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine's GPU would be used: the CUDA tests cover it")
def test_gpu_units_run_on_the_actors_ray_places(project, tmp_path, one_gpu_ray):
    """On a node that declares one GPU (torch sees none here), `workers: 2` units of one GPU each: Ray places one
    actor and the other waits unused while the first encodes every unit. The codec stage, with nothing to run on
    a GPU, stores the CPU's tokens; the msvq stage's actor finds no CUDA and the stage fails in one line, exit 2.
    """
    folder = pipeline(project, tmp_path, {"jpeg": project["codec"], "msvq": project["artifacts"]["msvq"]},
                      resources="{num_gpus: 1}", files_per_unit=10)
    run = arpipe("run", "pipeline.yaml", cwd=folder, env={"RAY_ADDRESS": one_gpu_ray}, timeout=240)
    out = run.stdout + run.stderr
    assert run.returncode == 2, out
    assert stage_lines(run.stdout)["jpeg"][-1] == "done", out
    assert "[jpeg] 4 units from" in out and "4 to encode with 2 worker(s) on cuda, 1 GPU each" in out
    assert "[jpeg] the codec tokenizer has nothing to run on a GPU: it encodes on the CPU" in out
    stored = store_tokens(folder, "jpeg")
    expected = encoded(project["codec"], project["arrays"])
    assert stored.keys() == expected.keys()
    assert all(np.array_equal(stored[k], expected[k]) for k in expected)
    assert stage_lines(run.stdout)["msvq"][-1] == "failed", out
    assert "device 'cuda' requested but CUDA is not available" in out
    assert "Traceback" not in out


# ------------------------------------------------------------------------------------------------ CUDA


def near_ties_only(uri: str, arrays: dict[str, np.ndarray], a: dict, b: dict) -> None:
    """Where two patch_vq encodings differ, both codes are equally near the patch to float32 rounding
    (devices sum in different orders; anything else would be a bug)."""
    tok = load_tokenizer(uri, device="cpu")
    x = torch.from_numpy(np.stack(list(arrays.values())))
    z_ND = tok.patch_vectors(x).reshape(-1, tok.codebook_KD.shape[1]).double()
    d_NK = torch.cdist(z_ND, tok.codebook_KD.double()).pow(2)
    a_N = torch.from_numpy(np.concatenate([a[k] for k in arrays]))
    b_N = torch.from_numpy(np.concatenate([b[k] for k in arrays]))
    rows = torch.nonzero(a_N != b_N).flatten()
    gap = (d_NK[rows, a_N[rows]] - d_NK[rows, b_N[rows]]).abs()
    assert bool((gap <= 1e-4 * (1 + d_NK[rows, a_N[rows]])).all()), f"{len(rows)} tokens differ beyond near-ties"


def agreement(a: dict, b: dict) -> float:
    return float(np.mean(np.concatenate([a[k] == b[k] for k in a])))


@cuda
def test_cuda_encodes_as_the_cpu_does(project):
    """Each tokenizer on cuda gives the CPU's tokens (patch_vq: up to exact near-ties; msvq and vqvae, whose later
    choices follow earlier ones: 99% of them), decodes as the CPU does, and leaves TF32 as it found it."""
    arrays = project["arrays"]
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    for kind, uri in project["artifacts"].items():
        tok = load_tokenizer(uri, device="cuda")
        assert tok.device.type == "cuda"
        cpu, gpu = encoded(uri, arrays, "cpu"), dict(zip(arrays, tok.encode_arrays(list(arrays.values()))))
        assert all(t.dtype == np.int64 and t.shape == cpu[k].shape for k, t in gpu.items()), kind
        if kind == "patch_vq":
            near_ties_only(uri, arrays, cpu, gpu)
        else:
            assert agreement(cpu, gpu) >= 0.99, (kind, agreement(cpu, gpu))
        tokens = list(cpu.values())
        np.testing.assert_allclose(np.stack(tok.decode_arrays(tokens)),
                                   np.stack(load_tokenizer(uri, device="cpu").decode_arrays(tokens)),
                                   atol=1e-4 if kind == "vqvae" else 1e-5, err_msg=kind)
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == tf32


@cuda
def test_tokenize_stage_on_a_gpu(project, tmp_path, ray_cluster):
    """`resources: {num_gpus: 0.5}`: the units run on Ray GPU tasks (two share the GPU) and store the CPU's
    tokens, to near-ties."""
    art = project["artifacts"]
    folder = pipeline(project, tmp_path, {"msvq": art["msvq"], "vqvae": art["vqvae"]}, resources="{num_gpus: 0.5}")
    run = arpipe("run", "pipeline.yaml", cwd=folder, env={"RAY_ADDRESS": ray_cluster}, check=True)
    assert all(states[-1] == "done" for states in stage_lines(run.stdout).values()), run.stdout
    assert "[msvq] 1 units from" in run.stdout and " on cuda, 0.5 GPU each" in run.stdout, run.stdout
    for stage in ("msvq", "vqvae"):
        stored, expected = store_tokens(folder, stage), encoded(project["artifacts"][stage], project["arrays"], "cpu")
        assert stored.keys() == expected.keys()
        assert agreement(expected, stored) >= 0.99, (stage, agreement(expected, stored))
