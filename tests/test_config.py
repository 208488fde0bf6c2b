import pytest

from pipeline import config, stages
from pipeline.config import ConfigError


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
    import dataclasses

    missing = dataclasses.replace(stages.get("base_train"), module="trainer.does_not_exist_yet")
    monkeypatch.setitem(stages.BY_NAME, "base_train", missing)
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
    monkeypatch.setattr(stages.Stage, "available", property(lambda stage: True))
    cfg = config.resolve("speedrun", {"nnodes": 2, "rdzv_endpoint": "10.0.0.1:29500", "stages": "base_train", "total_batch_size": 1048576})
    (cmd,) = config.stage_commands(cfg, "runs/abc")
    assert cmd.distributed and "--nnodes=2" in cmd.argv and "--rdzv-endpoint=10.0.0.1:29500" in cmd.argv
    assert "--rdzv-id=abc" in cmd.argv and "--standalone" not in cmd.argv


def test_single_process_stages_need_no_launcher(monkeypatch):
    monkeypatch.setattr(stages.Stage, "available", property(lambda stage: True))
    cfg = config.resolve("tiny", {"stages": "base_train"})
    (cmd,) = config.stage_commands(cfg, "runs/x")
    assert cmd.argv[1:3] == ["-m", "trainer.base_train"] and not cmd.distributed
    cfg = config.resolve("speedrun", {"stages": "base_train"})
    (cmd,) = config.stage_commands(cfg, "runs/x")
    assert "torch.distributed.run" in cmd.argv and "--nproc_per_node=8" in cmd.argv


def test_data_dir_must_be_an_existing_absolute_folder(tmp_path):
    from pipeline import config

    with pytest.raises(config.ConfigError) as e:
        config.resolve("tiny", {"data_dir": "relative/shards"})
    assert "absolute folder path" in e.value.errors["data_dir"]
    with pytest.raises(config.ConfigError) as e:
        config.resolve("tiny", {"data_dir": str(tmp_path / "missing")})
    assert "no such folder" in e.value.errors["data_dir"] and "gpt.data prepare" in e.value.errors["data_dir"]
    assert config.resolve("tiny", {"data_dir": str(tmp_path)})["data_dir"] == str(tmp_path)


@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "-inf", "Infinity", "1e999"])
def test_floats_must_be_finite(text):
    with pytest.raises(ConfigError) as err:
        config.resolve("tiny", {"target_param_data_ratio": text})
    assert "finite" in err.value.errors["target_param_data_ratio"]
    with pytest.raises(ConfigError) as err:
        config.resolve("tiny", {"target_param_data_ratio": float(text)})
    assert "finite" in err.value.errors["target_param_data_ratio"]


def test_numbers_too_large_for_a_float_or_for_text_are_refused_with_a_short_message():
    with pytest.raises(ConfigError) as err:
        config.resolve("tiny", {"target_param_data_ratio": 10**400, "depth": 10**5000, "vocab_size": "9" * 5000})
    errors = err.value.errors
    assert "number" in errors["target_param_data_ratio"]
    assert "at most 64" in errors["depth"] and len(errors["depth"]) < 200
    assert "at most" in errors["vocab_size"] and len(errors["vocab_size"]) < 200


def test_every_text_field_has_a_length_limit_and_says_so():
    for f in config.FIELDS:
        if f.kind is str:
            assert f.max_length, f.name
            with pytest.raises(ConfigError) as err:
                config.resolve("tiny", {f.name: "a" * (f.max_length + 1)})
            message = err.value.errors[f.name]
            assert f"at most {f.max_length}" in message and len(message) < 300, message


@pytest.mark.parametrize("value", ["x\x00y", "\ud800", "a\udcffb"])
def test_text_fields_refuse_nul_and_surrogates(value):
    # NUL and lone surrogates cannot be stored in PostgreSQL or encoded as UTF-8.
    for name in ("rdzv_endpoint", "data_dir", "data_source"):
        with pytest.raises(ConfigError) as err:
            config.resolve("tiny", {name: value})
        assert name in err.value.errors


@pytest.mark.parametrize("endpoint", ["10.0.0.1:29500", "node-1.cluster.local:1", "[fe80::1]:65535", "gpu7:29500",
                                      "[::1]:80", "gpu_node_1:29500"])
def test_rdzv_endpoint_accepts_host_port(endpoint):
    assert config.resolve("tiny", {"rdzv_endpoint": endpoint})["rdzv_endpoint"] == endpoint


@pytest.mark.parametrize("endpoint", ["10.0.0.1", "10.0.0.1:0", "10.0.0.1:65536", "10.0.0.1:99999999999", "host:port",
                                      "fe80::1:29500", "[nope]:29500", "-bad-.host:29500", "a b:1", "x" * (1 << 20),
                                      "300.1.1.1:29500", ":29500", "host:+80", "host:٢٩٥٠٠"])
def test_rdzv_endpoint_refuses_anything_but_host_port(endpoint):
    # Checked whenever it is given, not only for multi-node runs: nothing unusable is stored.
    with pytest.raises(ConfigError) as err:
        config.resolve("tiny", {"rdzv_endpoint": endpoint})
    message = err.value.errors["rdzv_endpoint"]
    assert ("HOST:PORT" in message or "at most 300 characters" in message) and len(message) < 300


def test_data_dir_paths_are_checked_before_the_filesystem_is_asked(tmp_path):
    # A component over 255 bytes made stat() fail with ENAMETOOLONG: a traceback instead of an error.
    cases = {
        "/data/" + "a" * 256: "255 bytes",
        "/data/" + "é" * 128: "255 bytes",  # 256 bytes in UTF-8
        "/" + "/".join(["abcdefgh"] * 500): "4096",
    }
    for path, words in cases.items():
        with pytest.raises(ConfigError) as err:
            config.resolve("tiny", {"data_dir": path})
        assert words in err.value.errors["data_dir"] and len(err.value.errors["data_dir"]) < 300
    with pytest.raises(ConfigError) as err:  # long but legal: the message quotes it shortened
        config.resolve("tiny", {"data_dir": "/" + "ab/" * 1300})
    assert "no such folder" in err.value.errors["data_dir"] and len(err.value.errors["data_dir"]) < 1000
    ok = tmp_path / ("b" * 255)
    ok.mkdir()
    assert config.resolve("tiny", {"data_dir": str(ok)})["data_dir"] == str(ok)


def test_data_dir_that_cannot_be_read_is_an_error_not_a_traceback(tmp_path, monkeypatch):
    # As root nothing is unreadable, so the refusal is simulated (EACCES, EIO, ... all look alike).
    class Unreadable(type(config.Path())):
        def stat(self, *args, **kwargs):
            raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(config, "Path", Unreadable)
    with pytest.raises(ConfigError) as err:
        config.resolve("tiny", {"data_dir": str(tmp_path)})
    assert "Permission denied" in err.value.errors["data_dir"]


@pytest.mark.parametrize("stages", [[{}], [1, 2], [["tok_train"]], "tok_train," + "x" * 100_000, [None]])
def test_stage_lists_hold_stage_names(stages):
    with pytest.raises(ConfigError) as err:
        config.resolve("tiny", {"stages": stages})
    assert "stage" in err.value.errors["stages"] and len(err.value.errors["stages"]) < 400


def test_preset_and_description_are_validated_too():
    with pytest.raises(ConfigError) as err:
        config.resolve(["tiny"])
    assert "unknown preset" in err.value.errors["preset"]
    with pytest.raises(ConfigError) as err:
        config.resolve("tiny", {"description": float("nan")})
    assert "text" in err.value.errors["description"]
    with pytest.raises(ConfigError) as err:
        config.resolve("tiny", {"description": "d" * 100_000})
    assert "at most" in err.value.errors["description"]


def test_unknown_settings_are_named_briefly():
    with pytest.raises(ConfigError) as err:
        config.validate({**config.defaults(), "k" * 10_000: 1, 7: 1})
    assert all(len(key) <= 100 and len(message) < 1000 for key, message in err.value.errors.items())
    assert any("unknown setting" in message for message in err.value.errors.values())


def test_the_batch_and_depth_are_judged_in_pipeline_plans_words():
    # One wording for the configuration, the estimate and a hand-typed base_train command (pipeline/plan.py).
    from pipeline import plan

    with pytest.raises(ConfigError) as err:
        config.resolve("tiny", {"total_batch_size": 3000, "nproc_per_node": 2, "depth": 0})
    assert err.value.errors["total_batch_size"] == plan.batch_mismatch(3000, 8, 256, 2)
    assert "use e.g. total_batch_size 4096" in err.value.errors["total_batch_size"]  # below 2 x 8 x 256: the one multiple up
    assert err.value.errors["depth"] == plan.at_least(1, 0) == "must be at least 1, got 0"
    with pytest.raises(ConfigError) as err:
        config.resolve("tiny", {"num_iterations": 0})
    assert err.value.errors["num_iterations"] == plan.horizon_problem(0, -1.0, 0.6)
