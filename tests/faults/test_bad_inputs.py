"""The bad-input corpus (``tests/data/bad``): every broken file gives its one clear line or is quarantined.

Pipeline files go through ``arpipe validate``, token stores through ``arpipe store``; media,
tokenizer artifacts and stores fed to training go through one ``arpipe run`` of a pipeline with
a stage per case, model folders through a second one that samples from each (media folders mix the bad files with good
ones from ``tests/realdata.py``). A case is handled when it ends in exit code 2 with one line that
names the file (or the stage's one failure line does), or when the file is quarantined in the
stage's ``rejects.arrow`` with its reason, the good files beside it tokenized; never a traceback.
"""

from __future__ import annotations

import io
import re
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from helpers import arpipe

from faults.tally import TALLY

CORPUS = Path(__file__).resolve().parents[1] / "data" / "bad"
#: an unhandled Python exception shown as it is, instead of a sentence about the file
RAW_EXCEPTION = re.compile(r"^(\w+\.)*[A-Z]\w*(Error|Exception|Warning)\b")


@dataclass
class Result:
    handled: bool
    detail: str


def record(case: str, result: Result) -> None:
    TALLY.bad_input(result.handled)
    assert result.handled, f"{case}: {result.detail}"


def one_line(proc, name: str, pattern: str) -> Result:
    """Exit 2, exactly one stderr line, naming ``name``, matching ``pattern``, no traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    text = proc.stdout + proc.stderr
    if "Traceback" in text:
        return Result(False, f"a traceback:\n{text[-2000:]}")
    if proc.returncode != 2 or len(lines) != 1:
        return Result(False, f"exit {proc.returncode}, {len(lines)} stderr lines:\n{proc.stderr[-2000:]}")
    if name not in lines[0] or not re.search(pattern, lines[0]):
        return Result(False, f"the line does not name {name!r} or say {pattern!r}: {lines[0]}")
    return Result(True, lines[0])


# ------------------------------------------------------------------------------ pipeline files

PIPELINES = {
    "tabs.yaml": r":\d+:\d+: YAML syntax error: found character '\\t'",
    "duplicate_key.yaml": r":12:3: stages\.a: duplicate key 'a'",
    "unknown_kind.yaml": r"unknown stage kind 'tokenise'; did you mean 'tokenize'\?",
    "bad_reference.yaml": r"unknown stage 'nope'",
    "python_tag.yaml": r"YAML tag .*python/object/apply.* is not allowed",
    "python_name_tag.yaml": r"YAML tag .*python/name.* is not allowed",
    "not_a_mapping.yaml": r"a pipeline file is a mapping",
    "empty.yaml": r"missing required field 'name'",
    "unknown_field.yaml": r"unknown field 'confg'; did you mean 'config'\?",
    "wrong_type.yaml": r"stages\.a\.config: input should be a valid dictionary",
    "cycle.yaml": r"cycle: a -> b -> a",
    "unset_env.yaml": r"environment variable ARPIPE_BAD_CORPUS_UNSET is not set",
    "bad_callable.yaml": r"stages\.a\.callable: string should match pattern",
    "missing_module.yaml": r":\d+:\d+: stages\.a: cannot find module 'no_such_module'",
    "train_bad_model.yaml": r"n_head \(4\) does not divide n_embd \(30\)",
    "train_ds_config_syntax.yaml": r": ds_config_syntax\.json:4:3: not valid JSON: Expecting property name",
    "control_two_origins.yaml": r"stages\.tokenize\.control: .*transform: canny\|sobel .* or as source: .* one of them",
    "alias_bomb.yaml": r"expands to more than \d+ values",
    "deep_nesting.yaml": r"nested too deeply",
    "not_utf8.yaml": r"not UTF-8 text",
}
#: pipelines whose line names another file of the corpus (a sibling the pipeline reads) instead of the pipeline's own
NAMED = {"train_ds_config_syntax.yaml": "ds_config_syntax.json"}


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_a_broken_pipeline_file_gives_one_line(tmp_path, name):
    shutil.copy(CORPUS / "pipelines" / name, tmp_path / name)
    for sibling in (CORPUS / "pipelines").glob("*.json"):
        shutil.copy(sibling, tmp_path / sibling.name)
    (tmp_path / "steps.py").write_text("def make(config, inputs, out_dir):\n    return {'out': 1}\n")
    proc = arpipe("validate", name, cwd=tmp_path, timeout=60)
    result = one_line(proc, NAMED.get(name, name), PIPELINES[name])
    if result.handled and list(tmp_path.glob("pwned")):
        result = Result(False, "a YAML tag ran code")
    record(name, result)


# --------------------------------------------------------------------------------- token stores

STORES = {
    "bad_checksum": ("verify", "shard-000001.bin", r"1 problem\(s\) found"),
    "no_manifest": ("info", "no_manifest", r"no manifest\.json"),
    "manifest_not_json": ("info", "manifest.json", r"manifest\.json is not JSON"),
    "truncated_shard": ("info", "shard-000002.bin", r"truncated"),
    "missing_index": ("info", "shard-000000.idx.arrow", r"missing"),
    "wrong_vocab": ("verify", "manifest.json", r"problem|digest"),
}


@pytest.mark.parametrize("name", sorted(STORES))
def test_a_broken_token_store_gives_one_line(tmp_path, name):
    command, names, pattern = STORES[name]
    store = shutil.copytree(CORPUS / "stores" / name, tmp_path / name)
    proc = arpipe("store", command, str(store), cwd=tmp_path, timeout=60)
    record(f"stores/{name}", one_line(proc, names, pattern))


# ------------------------------------------------------------- one run: media, artifacts, models

#: bad file -> what its reject reason (quarantine) must say
QUARANTINED = {
    "images/truncated.png": r"cannot decode image",
    "images/text.png": r"cannot decode image",
    "images/empty.png": r"cannot decode image",
    "images/garbage.jpg": r"cannot decode image",
    "images/nan.tif": r"NaN",
    "images/bomb.png": r"decompression bomb|over max_pixels",
    "tars/traversal.tar": r"refused 1 member.*'\.\.' in its path",
    "tars/absolute.tar": r"refused 1 member.*absolute path",
    "tars/symlink_out.tar": r"refused 1 member.*link to '/etc/passwd' outside",
    "tars/hardlink_out.tar": r"refused 1 member.*outside the shard",
    "tars/no_image.tar": r"no image member",
    "tars/truncated.tar": r"not a readable tar",
    "videos/truncated.gif": r"fewer than clip_len|cannot (open|decode)",
    "videos/garbage.mp4": r"cannot open video",
    "videos/empty.mp4": r"cannot open video",
    "videos/text.webm": r"cannot open video",
    "clouds/wrong_count.ply": r"cannot parse PLY.*end-of-file",
    "clouds/text.ply": r"cannot parse PLY",
    "clouds/empty.ply": r"no points",
    "clouds/nan.npy": r"NaN",
    "clouds/garbage.xyz": r"not numeric",
}

#: stage -> (the bad input it is given, what its one failure line must say)
FAILING = {
    "vol_empty": ("volumes/empty.mrc", r"empty\.mrc.*(cannot open|empty)"),
    "vol_bad_header": ("volumes/bad_header.mrc", r"bad_header\.mrc.*cannot open"),
    "vol_nan": ("volumes/nan.tif", r"nan\.tif: 2 of 2 samples rejected"),
    "vol_truncated": ("volumes/truncated.npy", r"truncated\.npy.*cannot open"),
    "vol_flat": ("volumes/flat.npy", r"flat\.npy.*3-D"),
    "tok_bad_json": ("tokenizers/bad_json", r"bad_json.*not valid JSON"),
    "tok_json_list": ("tokenizers/json_list", r"json_list.*holds a JSON list, not an object"),
    "tok_unknown_type": ("tokenizers/unknown_type", r"unknown_type.*unknown tokenizer type 'wavelet'"),
    "tok_future_format": ("tokenizers/future_format", r"future_format.*format 99"),
    "tok_hand_edited": ("tokenizers/hand_edited", r"hand_edited.*does not match its digest"),
    "tok_corrupt_weights": ("tokenizers/corrupt_weights", r"corrupt_weights.*does not match the sha256"),
    "tok_missing_weights": ("tokenizers/missing_weights", r"missing_weights.*missing"),
    "train_no_manifest": ("stores/no_manifest", r"no_manifest.*no manifest\.json"),
    "train_manifest_not_json": ("stores/manifest_not_json", r"manifest_not_json.*not JSON"),
    "train_truncated_shard": ("stores/truncated_shard", r"truncated_shard.*truncated"),
    "train_wrong_vocab": ("stores/wrong_vocab", r"wrong_vocab.*digest"),
}

#: model folders handed to a `sample` stage: stage -> (the folder, what its failure line must say)
MODELS = {
    "smp_corrupt_safetensors": ("models/corrupt_safetensors", r"corrupt_safetensors.*model\.safetensors"),
    "smp_truncated_safetensors": ("models/truncated_safetensors", r"truncated_safetensors.*model\.safetensors"),
    "smp_config_format": ("models/config_format", r"config_format.*format 7"),
    "smp_config_not_json": ("models/config_not_json", r"config_not_json.*config\.json"),
    "smp_pickle_weights": ("models/pickle_weights", r"pickle_weights.*model\.safetensors"),
}

MEDIA_STAGES = {"images": "img", "tars": "tars", "videos": "vid", "clouds": "pts"}


def _good_tar(path: Path, digits: list[np.ndarray]) -> None:
    from PIL import Image

    with tarfile.open(path, "w") as tar:
        for i, image in enumerate(digits):
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, format="PNG")
            for name, data in ((f"g{i}.png", buf.getvalue()), (f"g{i}.cls", str(i).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def build_project(root: Path, prepared: dict) -> Path:
    """Folders of bad files mixed with good ones, and one pipeline with a stage per case."""
    from realdata import brain_clouds, digits_folder, gif_path, mni_volume
    from sklearn.datasets import load_digits

    data = root / "data"
    for folder in ("images", "tars", "videos", "clouds"):
        shutil.copytree(CORPUS / folder, data / folder)
    digits_folder(data / "images" / "good", count=8)
    _good_tar(data / "tars" / "good.tar", [(a * (255 / 16)).astype(np.uint8) for a in load_digits().images[:4]])
    (data / "video_good").mkdir()
    shutil.copy(gif_path(), data / "video_good" / "clip.gif")
    shutil.copy(gif_path(), data / "videos" / "good.gif")
    brain_clouds(data / "cloud_good", count=2, points=512)
    for ply in (data / "cloud_good").iterdir():
        shutil.copy(ply, data / "clouds" / ply.name)
    np.save(data / "volume_good.npy", mni_volume(2)[20:36, 30:62, 30:62].copy())
    digits_folder(data / "few_digits", count=4)

    image = "{modality: image, uri: %s, channels: 1, size: 8, files_per_unit: 4}"
    stages = {
        "img": f"kind: tokenize\n    source: {image % (data / 'images')}\n    tokenizer: \"{prepared['tokenizer']}\"\n"
               f"    max_reject_fraction: 0.99",
        "tars": f"kind: tokenize\n    source: {{modality: image, uri: {data / 'tars'}, channels: 1, size: 8, "
                f"format: webdataset}}\n    tokenizer: \"{prepared['tokenizer']}\"\n    max_reject_fraction: 0.99",
        "vid_tok": f"kind: tokenizer\n    source: {{modality: video, uri: {data / 'video_good'}, clip_len: 8, "
                   f"stride: 8, size: 16}}\n    tokenizer: {{type: patch_vq, patch: [2, 4, 4], codebook_size: 16}}\n"
                   f"    fit: {{max_samples: 3, heldout: 1}}",
        "vid": f"kind: tokenize\n    source: {{modality: video, uri: {data / 'videos'}, clip_len: 8, stride: 8, "
               f"size: 16}}\n    tokenizer: ${{vid_tok.tokenizer}}\n    max_reject_fraction: 0.99",
        "pts_tok": f"kind: tokenizer\n    source: {{modality: pointcloud, uri: {data / 'cloud_good'}}}\n"
                   f"    tokenizer: {{type: octree, depth: 4}}\n    fit: {{max_samples: 2, heldout: 1}}",
        "pts": f"kind: tokenize\n    source: {{modality: pointcloud, uri: {data / 'clouds'}}}\n"
               f"    tokenizer: ${{pts_tok.tokenizer}}\n    max_reject_fraction: 0.99",
        "vol_tok": f"kind: tokenizer\n    source: {{modality: volume, uri: {data / 'volume_good.npy'}, "
                   f"crop: [8, 16, 16]}}\n    tokenizer: {{type: patch_vq, patch: [4, 8, 8], codebook_size: 16}}\n"
                   f"    fit: {{max_samples: 8, heldout: 1}}",
    }
    for stage, (bad, _pattern) in FAILING.items():
        path = CORPUS / bad
        if stage.startswith("vol_"):
            stages[stage] = (f"kind: tokenize\n    source: {{modality: volume, uri: {path}, crop: [8, 16, 16]}}\n"
                             f"    tokenizer: ${{vol_tok.tokenizer}}")
        elif stage.startswith("tok_"):
            stages[stage] = f"kind: tokenize\n    source: {image % (data / 'few_digits')}\n    tokenizer: \"{path}\""
        else:
            stages[stage] = (f"kind: train\n    data: [{{store: \"{path}\"}}]\n    model: {{preset: tiny, n_layer: 1, "
                             f"n_embd: 16, n_head: 2}}\n    global_batch: 4\n    steps: 1")
    text = "name: badcorpus\nstorage: ./runs\nstages:\n" + "".join(
        f"  {name}:\n    {body}\n" for name, body in stages.items())
    (root / "pipeline.yaml").write_text(text)
    return root


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory, fault_ray, prepared):
    """One `arpipe run` of every media, volume, tokenizer artifact and store case."""
    folder = build_project(tmp_path_factory.mktemp("badcorpus"), prepared)
    proc = arpipe("run", "pipeline.yaml", cwd=folder, env={"RAY_ADDRESS": fault_ray.address}, timeout=600)
    return folder, proc


@pytest.fixture(scope="module")
def model_run(tmp_path_factory, fault_ray):
    """One `arpipe run` with a `sample` stage per broken model folder."""
    folder = tmp_path_factory.mktemp("badmodels")
    (folder / "pipeline.yaml").write_text("name: badmodels\nstorage: ./runs\nstages:\n" + "".join(
        f"  {stage}:\n    kind: sample\n    model: \"{CORPUS / bad}\"\n    num_samples: 1\n"
        for stage, (bad, _pattern) in MODELS.items()))
    return folder, arpipe("run", "pipeline.yaml", cwd=folder, env={"RAY_ADDRESS": fault_ray.address}, timeout=600)


def stage_failure(stdout: str, stage: str) -> str | None:
    for line in stdout.splitlines():
        parts = line.split(None, 2)
        if line.startswith("  ") and len(parts) >= 2 and parts[0] == stage and parts[1] == "failed":
            return parts[2] if len(parts) > 2 else ""
    return None


def rejects(folder: Path, stage: str) -> list[dict]:
    import pyarrow.ipc as ipc

    found = list(folder.glob(f"runs/{stage}/*/rejects.arrow"))
    return ipc.open_file(str(found[0])).read_all().to_pylist() if found else []


def test_the_corpus_run_ends_in_one_line(corpus_run):
    folder, proc = corpus_run
    lines = [line for line in proc.stderr.splitlines() if line.startswith("arpipe:")]
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout[-4000:]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]   # 2: every failure is the input's
    assert lines[0].startswith("arpipe: error: stage(s) failed: ")


@pytest.mark.parametrize("bad", sorted(QUARANTINED))
def test_a_bad_media_file_is_quarantined_with_its_reason(corpus_run, bad):
    folder, proc = corpus_run
    stage = MEDIA_STAGES[bad.split("/")[0]]
    name = bad.split("/")[1]
    failure = stage_failure(proc.stdout, stage)
    rows = [r for r in rejects(folder, stage) if name in r["source"]]
    if failure is not None:
        result = Result(False, f"stage {stage} failed instead of quarantining: {failure}")
    elif not rows:
        result = Result(False, f"{bad} is not in {stage}'s rejects.arrow ({len(rejects(folder, stage))} rows)")
    else:
        reason = rows[0]["reason"]
        ok = bool(re.search(QUARANTINED[bad], reason)) and "\n" not in reason and "Traceback" not in reason
        result = Result(ok, f"reason: {reason!r}")
    record(bad, result)


def test_good_files_beside_bad_ones_are_tokenized(corpus_run):
    """Quarantine costs only the bad file: the good images, tar members, clip and clouds are in the stores."""
    from arpipe.stages.store import TokenStore

    folder, _proc = corpus_run
    keys = {}
    for stage in MEDIA_STAGES.values():
        store = next(folder.glob(f"runs/{stage}/*/store"), None)
        assert store is not None, f"{stage} has no store"
        opened = TokenStore.open(str(store))
        keys[stage] = {opened[i].key for i in range(len(opened))}
    assert len([k for k in keys["img"] if k.startswith("good/")]) == 8
    # a refused member costs the shard nothing else: its good samples were kept
    for shard in ("traversal", "absolute", "symlink_out", "hardlink_out", "good"):
        assert {f"{shard}.tar/s0", f"{shard}.tar/s1"} & keys["tars"] or shard == "good", (shard, keys["tars"])
    assert any(k.startswith("good.gif") for k in keys["vid"]), keys["vid"]
    assert len(keys["pts"]) == 2, keys["pts"]
    assert not Path("/tmp/arpipe-absolute.png").exists()


def failure_result(stdout: str, stage: str, bad: str, pattern: str) -> Result:
    failure = stage_failure(stdout, stage)
    if failure is None:
        return Result(False, f"stage {stage} did not fail on {bad}")
    if RAW_EXCEPTION.match(failure) or "Traceback" in failure:
        return Result(False, f"a raw exception instead of a sentence: {failure}")
    if not re.search(pattern, failure):
        return Result(False, f"the line does not say {pattern!r}: {failure}")
    return Result(True, failure)


@pytest.mark.parametrize("stage", sorted(FAILING))
def test_a_bad_volume_artifact_or_store_fails_its_stage_with_one_line(corpus_run, stage):
    folder, proc = corpus_run
    bad, pattern = FAILING[stage]
    record(bad, failure_result(proc.stdout, stage, bad, pattern))


@pytest.mark.parametrize("stage", sorted(MODELS))
def test_a_broken_model_folder_fails_its_sample_stage_with_one_line(model_run, stage):
    folder, proc = model_run
    bad, pattern = MODELS[stage]
    record(bad, failure_result(proc.stdout, stage, bad, pattern))
