"""A user's ds_config.json (`deepspeed.config_file`): merged between the generated config and the inline
`deepspeed.config`, "auto" taking arpipe's values, a key the stage's fields decide refused in one line
when it disagrees, and the file's content in the fingerprint. No Ray, no training."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import arpipe, write

from arpipe.pipeline.errors import UserError
from arpipe.schemas.train import TrainStage as TrainSpec
from arpipe.stages.train import TrainStage
from arpipe.stages.train.ds_config import ConfigFile, build_ds_config, check_config_file


def spec(**fields) -> TrainSpec:
    return TrainSpec.model_validate({"kind": "train", "data": [{"store": "./store"}], "global_batch": 8,
                                     "steps": 10, **fields})


def file(config: dict) -> ConfigFile:
    return ConfigFile("ds_config.json", config)


def refusal(stage: TrainSpec, config: dict, steps: int = 10) -> str:
    with pytest.raises(UserError) as caught:
        build_ds_config(stage, steps, file(config))
    return str(caught.value)


def test_the_file_goes_over_the_generated_config_and_the_inline_config_over_both():
    stage = spec(deepspeed={"config": {"steps_per_print": 7, "zero_optimization": {"reduce_bucket_size": 3}}})
    config = build_ds_config(stage, 10, file({
        "steps_per_print": 5, "wall_clock_breakdown": True,
        "zero_optimization": {"stage": 2, "reduce_bucket_size": 2, "allgather_bucket_size": 4},
        "optimizer": {"params": {"eps": 1e-6}}}))
    assert config["steps_per_print"] == 7 and config["wall_clock_breakdown"] is True
    assert config["zero_optimization"] == {"stage": 2, "overlap_comm": False, "contiguous_gradients": True,
                                           "reduce_bucket_size": 3, "allgather_bucket_size": 4}
    assert config["optimizer"]["params"]["eps"] == 1e-6
    assert config["optimizer"]["params"]["lr"] == build_ds_config(stage, 10)["optimizer"]["params"]["lr"]


def test_auto_takes_arpipes_value_or_leaves_the_key_to_deepspeed():
    stage = spec(deepspeed={"precision": "bf16", "zero_stage": 3}, micro_batch=2)
    config = build_ds_config(stage, 10, file({
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto"}},
        "zero_optimization": {"stage": "auto", "reduce_bucket_size": "auto", "stage3_param_persistence_threshold": 9}}))
    assert config == {**build_ds_config(stage, 10),
                      "zero_optimization": {**build_ds_config(stage, 10)["zero_optimization"],
                                            "stage3_param_persistence_threshold": 9}}
    assert "fp16" not in config and config["bf16"] == {"enabled": True}
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"],
            config["gradient_accumulation_steps"]) == (8, 2, 4)


def test_a_schedule_of_another_type_replaces_arpipes_with_its_autos_filled():
    config = build_ds_config(spec(), 10, file({"scheduler": {"type": "WarmupLR", "params": {
        "warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto"}}}))
    lr = config["optimizer"]["params"]["lr"]
    assert config["scheduler"] == {"type": "WarmupLR", "params": {"warmup_max_lr": lr, "warmup_num_steps": 1}}


@pytest.mark.parametrize("fields, config, line", [
    ({}, {"zero_optimization": {"stage": 3}},
     r"^ds_config\.json: zero_optimization\.stage: 3 in the file, but this stage's deepspeed\.zero_stage makes it 2; drop "
     r"zero_optimization\.stage from the file \(or make it \"auto\"\), or set deepspeed\.zero_stage: 3 in the stage$"),
    ({}, {"bf16": {"enabled": True}},
     r"bf16\.enabled: true in the file, but this stage's deepspeed\.precision \(fp32\) makes it false; .* set "
     r"deepspeed\.precision: bf16"),
    ({"deepspeed": {"precision": "fp16"}}, {"fp16": {"enabled": False}},
     r"fp16\.enabled: false in the file, .*deepspeed\.precision \(fp16\) makes it true; .*deepspeed\.precision: fp32"),
    ({}, {"train_micro_batch_size_per_gpu": 2}, r"train_micro_batch_size_per_gpu: 2 in the file, .*micro_batch makes it 8"),
    ({}, {"gradient_accumulation_steps": 2}, r"gradient_accumulation_steps: 2 in the file, .*set global_batch: 16"),
    ({}, {"gradient_clipping": 0.5}, r"gradient_clipping: 0\.5 in the file, .*makes it 1\.0; .*gradient_clipping: 0\.5"),
    ({}, {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}},
     r"offload_optimizer\.device: cpu in the file, .*deepspeed\.offload_optimizer makes it none; .*offload_optimizer: true"),
    ({"optimizer": {"lr": 0.01}}, {"optimizer": {"params": {"lr": 0.02}}}, r"lr: 0\.02 in the file, .*makes it 0\.01"),
])
def test_a_key_the_stage_decides_is_refused_when_it_disagrees(fields, config, line):
    assert re.search(line, refusal(spec(**fields), config))


def test_agreeing_keys_pass_and_several_conflicts_are_one_line():
    stage = spec(deepspeed={"zero_stage": 1, "offload_optimizer": True, "precision": "bf16"})
    config = build_ds_config(stage, 10, file({
        "zero_optimization": {"stage": 1, "offload_optimizer": {"device": "nvme", "nvme_path": "/x"}},
        "bf16": {"enabled": True}, "fp16": {"enabled": False}, "train_batch_size": 8, "gradient_clipping": 1}))
    assert config["zero_optimization"]["offload_optimizer"] == {"device": "nvme", "nvme_path": "/x", "pin_memory": False}
    line = refusal(spec(), {"zero_optimization": {"stage": 0}, "train_batch_size": 16})
    assert "\n" not in line and line.startswith("ds_config.json: 2 keys disagree with this stage's fields: ")
    assert "set deepspeed.zero_stage: 0, global_batch: 16 in the stage" in line


def test_the_step_budget_is_compared_once_it_is_known(tmp_path):
    (tmp_path / "ds.json").write_text(json.dumps({"scheduler": {"params": {"total_num_steps": 99}}}))
    by_epochs = spec(steps=None, epochs=2, deepspeed={"config_file": "ds.json"})
    assert check_config_file(by_epochs, tmp_path) is not None      # before the stores are read: not known
    assert "total_num_steps: 99 in the file, but this stage's steps makes it 50" in refusal(
        by_epochs, {"scheduler": {"params": {"total_num_steps": 99}}}, steps=50)
    with pytest.raises(UserError, match="total_num_steps: 99 in the file"):
        check_config_file(spec(deepspeed={"config_file": "ds.json"}), tmp_path)


def test_the_files_content_is_in_the_fingerprint(tmp_path):
    stage = spec(deepspeed={"config_file": "ds.json"})
    assert TrainStage.code_digest(spec(), tmp_path) is None
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"reduce_bucket_size": 2}}')
    first = TrainStage.code_digest(stage, tmp_path)
    (tmp_path / "ds.json").write_text('{\n  "zero_optimization": {\n    "reduce_bucket_size": 2\n  }\n}\n')
    assert TrainStage.code_digest(stage, tmp_path) == first          # reformatted: the same config
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"reduce_bucket_size": 3}}')
    assert TrainStage.code_digest(stage, tmp_path) not in (first, None)
    assert TrainStage.code_digest(spec(deepspeed={"config_file": "${make.ds}"}), tmp_path) is None   # an output


def test_the_run_reads_the_file_it_was_planned_with(tmp_path):
    from arpipe.pipeline.stage import StageContext

    stage = spec(deepspeed={"config_file": "ds.json"})
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"reduce_bucket_size": 2}}')
    ctx = StageContext("train", "train", "f" * 64, str(tmp_path / "out"), tmp_path / "out", tmp_path,
                       code_digest=TrainStage.code_digest(stage, tmp_path))
    assert TrainStage(stage, ctx)._config_file().config == {"zero_optimization": {"reduce_bucket_size": 2}}
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"reduce_bucket_size": 3}}')
    with pytest.raises(UserError, match=r"^ds\.json: changed since this run planned the stage"):
        TrainStage(stage, ctx)._config_file()


#: the train stage waits on an upstream stage: its file is still checked before anything runs
PIPELINE = """
name: dsconfig
storage: ./runs
stages:
  prep:
    kind: python
    callable: steps:make
  train:
    kind: train
    data: [{store: ./store}]
    needs: [prep]
    model: {preset: tiny, n_layer: 1, n_embd: 16, n_head: 2}
    deepspeed: {zero_stage: 2, config_file: ds_config.json}
    global_batch: 4
    steps: 3
"""


def one_line(proc) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


STEPS = "def make(config, inputs, out_dir):\n    return {'out': 1}\n"


@pytest.mark.parametrize("command", ["validate", "plan", "run"])
def test_a_syntax_error_in_the_file_is_one_line_with_its_line_and_column(tmp_path: Path, command):
    write(tmp_path, {"pipeline.yaml": PIPELINE, "steps.py": STEPS,
                     "ds_config.json": '{\n  "zero_optimization": {\n    "stage": 2,\n  }\n}\n'})
    line = one_line(arpipe(command, "pipeline.yaml", cwd=tmp_path))
    assert re.search(r"ds_config\.json:4:3: not valid JSON: Expecting property name .*; .*no trailing commas", line)
    assert not (tmp_path / "runs").exists()      # refused before anything ran


def test_a_conflicting_key_in_the_file_is_one_line(tmp_path: Path):
    write(tmp_path, {"pipeline.yaml": PIPELINE, "steps.py": STEPS,
                     "ds_config.json": '{"zero_optimization": {"stage": 3}, "train_batch_size": "auto"}'})
    line = one_line(arpipe("validate", "pipeline.yaml", cwd=tmp_path))
    assert re.search(r"ds_config\.json: zero_optimization\.stage: 3 in the file, .*deepspeed\.zero_stage makes it 2; "
                     r".*set deepspeed\.zero_stage: 3", line)


def test_a_missing_file_is_one_line_at_the_stage(tmp_path: Path):
    write(tmp_path, {"pipeline.yaml": PIPELINE, "steps.py": STEPS})
    line = one_line(arpipe("validate", "pipeline.yaml", cwd=tmp_path))
    assert re.search(r"pipeline\.yaml:\d+:\d+: stages\.train: deepspeed\.config_file: no file ds_config\.json", line)
