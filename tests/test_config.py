"""The run config: every error path names the problem and the fix."""

import pytest

from scalora.config import ConfigError, RunConfig, load_config


def _write(tmp_path, text):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return str(p)


def test_shipped_configs_load():
    import glob

    paths = sorted(glob.glob("configs/*.yaml"))
    assert "configs/tiny.yaml" in paths and len(paths) >= 4
    for path in paths:
        assert isinstance(load_config(path), RunConfig)


def test_unknown_keys_suggest_the_nearest(tmp_path):
    path = _write(tmp_path, "train:\n  learning_rate: 1e-4\n  lr: 1e-4\nlora:\n  rank: 8\nmodle:\n  dtype: auto\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    text = str(e.value)
    assert "3 problem(s)" in text
    assert "unknown key 'lora.rank'" in text and "unknown section 'modle'; did you mean 'model'?" in text
    assert "unknown key 'train.learning_rate'" in text


def test_types_and_values_reported_at_once(tmp_path):
    path = _write(tmp_path, "quant:\n  bits: 3\nlora:\n  r: 0\n  lora_dropout: 1.5\ntrain:\n  lr: -1\n"
                            "  global_batch_size: 10\n  micro_batch_size: 4\n  schedule: wavy\n"
                            "model:\n  trust_remote_code: 'yes'\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    text = str(e.value)
    for expected in ("quant.bits=3: must be 4, 8 or 16", "lora.r=0", "lora.lora_dropout=1.5", "train.lr=-1:",
                     "global_batch_size=10 is not a multiple of train.micro_batch_size=4",
                     "train.schedule='wavy': must be one of 'cosine', 'linear', 'constant'",
                     "model.trust_remote_code='yes': must be bool"):
        assert expected in text, expected


def test_overrides(tmp_path):
    cfg = load_config("configs/tiny.yaml", ["train.lr=1e-4", "lora.r=4", "lora.target_modules=[q_proj, v_proj]",
                                            "log.report_to=none"])
    assert cfg.train.lr == 1e-4 and cfg.lora.r == 4 and cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.log.report_to == "none"
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config("configs/tiny.yaml", ["lr=1"])
    with pytest.raises(ConfigError, match="unknown key 'train.lrr'; did you mean 'lr'"):
        load_config("configs/tiny.yaml", ["train.lrr=1"])


def test_malformed_yaml_and_missing_file(tmp_path):
    path = _write(tmp_path, "train:\n  lr: [1\n  seed: 2\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+, column \d+"):
        load_config(path)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("configs/tiny.yaml", ["lora.r=4"])
    cfg.save(str(tmp_path / "c.yaml"))
    assert load_config(str(tmp_path / "c.yaml")) == cfg


def test_launched_processes_check_the_launcher_settings_from_their_environment(monkeypatch, tmp_path,
                                                                                untrained_base):
    """What `accelerate launch` hands its processes (its environment) is read as a launch file would be, and checked
    against the run config in one message before the model loads; the data is left to the run (tests/test_dist.py
    runs the launcher itself)."""
    import json
    import os

    from scalora import preflight
    from scalora.core.errors import UserError

    for key in [k for k in os.environ if k.startswith("ACCELERATE_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert preflight.launched_settings()["kind"] == "ddp"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert preflight.launched_settings()["kind"] == "fsdp"
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}, "gradient_accumulation_steps": 4}))
    for key, value in [("ACCELERATE_USE_DEEPSPEED", "true"), ("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ds)),
                       ("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"), ("ACCELERATE_MIXED_PRECISION", "fp16"),
                       ("ACCELERATE_GRADIENT_CLIPPING", "0.5")]:  # --gradient_clipping, where the file has none
        monkeypatch.setenv(key, value)
    launch = preflight.launched_settings()
    assert launch["kind"] == "zero3" and launch["mixed_precision"] == "fp16"  # the file's stage, as accelerate's
    cfg = load_config(None, [f"model.name_or_path={untrained_base}", "model.dtype=float32", "quant.bits=8",
                             "train.micro_batch_size=4", f"data.train_file={tmp_path / 'missing.jsonl'}",
                             f"train.output_dir={tmp_path / 'out'}"])
    with pytest.raises(UserError) as e:
        preflight.check(cfg, 2, launch, inputs=False)
    message = str(e.value)
    assert message.startswith("3 problems"), message
    for part in ("under zero3: quant.bits=8", "gradient_accumulation_steps=4 (scalora's: 2",
                 "gradient_clipping=0.5 (scalora's: 1.0", "mixed_precision=fp16, but model.dtype=float32"):
        assert part in message, (part, message)
    assert "missing.jsonl" not in message and not (tmp_path / "out").exists()
    with pytest.raises(UserError) as e:
        preflight.check(cfg, 2, launch)  # `scalora train`'s own check, before it launches, reads the data too
    assert message.startswith("3 problems") and str(e.value).startswith("4 problems")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(tmp_path / "nowhere.json"))
    with pytest.raises(UserError, match="nowhere.json.*relative to the folder you launch from"):
        preflight.launched_settings()
