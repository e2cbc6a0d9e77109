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
