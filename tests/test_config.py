import pytest

from trainer import config
from trainer.config import ConfigError


def test_every_preset_resolves_and_lists_runnable_stages():
    for name in config.PRESETS:
        cfg = config.resolve(name)
        assert cfg["preset"] == name
        cmds = config.stage_commands(cfg, "runs/x")
        assert [c.name for c in cmds] == cfg["stages"]
        assert all("--run-dir" in c.argv for c in cmds)


def test_overrides_are_coerced_from_text():
    cfg = config.resolve("tiny", {"vocab_size": "8_192", "tok_max_chars": "2e6", "stages": "tok_train"})
    assert cfg["vocab_size"] == 8192 and cfg["tok_max_chars"] == 2_000_000 and cfg["stages"] == ["tok_train"]


@pytest.mark.parametrize("overrides, field, words", [
    ({"depth": 0}, "depth", "at least"),
    ({"depth": "abc"}, "depth", "whole number"),
    ({"depth": "2.5"}, "depth", "whole number"),
    ({"max_seq_len": 300}, "max_seq_len", "power of two"),
    ({"total_batch_size": 1000}, "total_batch_size", "multiple"),
    ({"data_source": "c4"}, "data_source", "one of"),
    ({"stages": "tok_train,warp_drive"}, "stages", "unknown stage"),
    ({"stages": ""}, "stages", "at least one"),
    ({"vocab_size": 100}, "vocab_size", "at least"),
    ({"dpeth": 3}, "dpeth", "unknown setting"),
])
def test_bad_values_name_the_field_and_the_fix(overrides, field, words):
    with pytest.raises(ConfigError) as err:
        config.resolve("tiny", overrides)
    assert field in err.value.errors
    assert words in err.value.errors[field]


def test_stage_not_yet_built_is_refused_with_the_available_list(monkeypatch):
    monkeypatch.setitem(config.STAGE_MODULES, "base_train", "trainer.does_not_exist_yet")
    with pytest.raises(ConfigError) as err:
        config.resolve("tiny", {"stages": "tok_train,base_train"})
    assert "available" in err.value.errors["stages"] and "tok_train" in err.value.errors["stages"]


def test_stages_run_in_pipeline_order_whatever_order_they_are_given():
    cfg = config.resolve("tiny", {"stages": ["tok_eval", "tok_train"]})
    assert cfg["stages"] == ["tok_train", "tok_eval"]


def test_unknown_preset():
    with pytest.raises(ConfigError) as err:
        config.resolve("huge")
    assert "tiny" in err.value.errors["preset"]


def test_cli_prints_commands(capsys):
    config.main(["tiny", "--set", "vocab_size=1024", "--run-dir", "runs/t"])
    out = capsys.readouterr().out
    assert "trainer.tok_train" in out and "--vocab-size=1024" in out


def test_multi_node_needs_a_rendezvous_endpoint_and_uses_torchrun(monkeypatch):
    with pytest.raises(ConfigError) as err:
        config.resolve("speedrun", {"nnodes": 2})
    assert "HOST:PORT" in err.value.errors["rdzv_endpoint"]
    monkeypatch.setattr(config, "stage_available", lambda s: True)
    cfg = config.resolve("speedrun", {"nnodes": 2, "rdzv_endpoint": "10.0.0.1:29500", "stages": "base_train", "total_batch_size": 1048576})
    (cmd,) = config.stage_commands(cfg, "runs/abc")
    assert cmd.distributed and "--nnodes=2" in cmd.argv and "--rdzv-endpoint=10.0.0.1:29500" in cmd.argv
    assert "--rdzv-id=abc" in cmd.argv and "--standalone" not in cmd.argv


def test_single_process_stages_need_no_launcher(monkeypatch):
    monkeypatch.setattr(config, "stage_available", lambda s: True)
    cfg = config.resolve("tiny", {"stages": "base_train"})
    (cmd,) = config.stage_commands(cfg, "runs/x")
    assert cmd.argv[1:3] == ["-m", "trainer.base_train"] and not cmd.distributed
    cfg = config.resolve("speedrun", {"stages": "base_train"})
    (cmd,) = config.stage_commands(cfg, "runs/x")
    assert "torch.distributed.run" in cmd.argv and "--nproc_per_node=8" in cmd.argv


def test_data_dir_must_be_an_existing_absolute_folder(tmp_path):
    from trainer import config

    with pytest.raises(config.ConfigError) as e:
        config.resolve("tiny", {"data_dir": "relative/shards"})
    assert "absolute folder path" in e.value.errors["data_dir"]
    with pytest.raises(config.ConfigError) as e:
        config.resolve("tiny", {"data_dir": str(tmp_path / "missing")})
    assert "no such folder" in e.value.errors["data_dir"] and "trainer.data prepare" in e.value.errors["data_dir"]
    assert config.resolve("tiny", {"data_dir": str(tmp_path)})["data_dir"] == str(tmp_path)
