"""Settings: defaults, precedence, and one clear message for every kind of bad input (#2)."""

from __future__ import annotations

import pytest

from agent.errors import ConfigError
from agent.settings import DEFAULT_CONFIG_PATH, Settings, config_path, load_settings


def test_defaults_are_valid_and_safe():
    s = Settings.model_validate({})
    assert s.server.host == "127.0.0.1" and s.server.port == 8080
    assert s.engines.chain == ["vllm", "llamacpp"]
    assert s.model.ref == "default"


def test_every_field_has_a_description_and_a_default():
    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            assert not field.is_required(), f"{model.__name__}.{name} has no default"
            sub = field.annotation
            if isinstance(sub, type) and hasattr(sub, "model_fields"):
                walk(sub)
    walk(Settings)


def test_file_env_and_cli_layer_in_order(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("server:\n  port: 9001\n  host: 127.0.0.2\nplanner:\n  target_context: 4096\n")
    s = load_settings(cfg, env={"NODE_AGENT_SERVER__PORT": "9002"}, overrides={"planner": {"target_context": 2048}})
    assert s.server.port == 9002  # env beats file
    assert s.server.host == "127.0.0.2"  # file beats default
    assert s.planner.target_context == 2048  # command line beats everything


def test_config_path_comes_from_flag_then_env_then_default(tmp_path):
    assert config_path(tmp_path / "a.yaml", {"NODE_AGENT_CONFIG": "/x.yaml"}) == (tmp_path / "a.yaml", True)
    assert config_path(None, {"NODE_AGENT_CONFIG": "/x.yaml"})[0].as_posix() == "/x.yaml"
    assert config_path(None, {}) == (DEFAULT_CONFIG_PATH, False)
    # install.sh --user writes $XDG_CONFIG_HOME/node-agent/config.yaml: used when it exists.
    xdg = {"XDG_CONFIG_HOME": str(tmp_path)}
    assert config_path(None, xdg) == (DEFAULT_CONFIG_PATH, False)
    (tmp_path / "node-agent").mkdir()
    (tmp_path / "node-agent" / "config.yaml").write_text("{}\n")
    assert config_path(None, xdg) == (tmp_path / "node-agent" / "config.yaml", False)
    assert config_path(None, {"HOME": str(tmp_path / "nobody")}) == (DEFAULT_CONFIG_PATH, False)


def test_nested_list_from_env():
    s = load_settings(env={"NODE_AGENT_ENGINES__CHAIN": '["llamacpp"]'})
    assert s.engines.chain == ["llamacpp"]


@pytest.mark.parametrize(
    "text, fragments",
    [
        ("server:\n  prot: 8080\n", ["server.prot", "unknown key", "c.yaml"]),
        ("serve:\n  port: 8080\n", ["serve", "unknown key"]),
        ("server:\n  port: 70000\n", ["server.port", "less than or equal to 65535", "70000", "c.yaml"]),
        ("planner:\n  safety_margin_mib: -1\n", ["planner.safety_margin_mib", "greater than or equal to 0"]),
        ("engines:\n  chain: [llamacpp, vllm]\n", ["engines.chain", "terminal"]),
        ("engines:\n  chain: [vllm, vllm, llamacpp]\n", ["engines.chain", "once"]),
        ("engines:\n  chain: [tgi, llamacpp]\n", ["engines.chain"]),
        ("planner:\n  min_context: 9000\n  target_context: 4096\n", ["min_context (9000) exceeds"]),
        ("server: [\n", ["not valid YAML", "line 2"]),
        ("- 1\n- 2\n", ["must be a mapping"]),
    ],
)
def test_bad_files_give_one_clear_message(tmp_path, text, fragments):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, env={})
    for fragment in fragments:
        assert fragment in str(info.value)
    assert info.value.exit_code == 2


def test_empty_file_means_defaults(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("")
    assert load_settings(cfg, env={}).server.port == 8080


def test_unreadable_or_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        load_settings(tmp_path, env={})  # a directory cannot be read as a file (works as root too)
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml", env={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(env={"NODE_AGENT_CONFIG": str(tmp_path / "nope.yaml")})


def test_bad_environment_names_the_variable():
    with pytest.raises(ConfigError, match=r"server.port.*NODE_AGENT_\* environment"):
        load_settings(env={"NODE_AGENT_SERVER__PORT": "http"})
    with pytest.raises(ConfigError, match="unknown environment variable.*NODE_AGENT_SERVR__PORT"):
        load_settings(env={"NODE_AGENT_SERVR__PORT": "1"})


def test_short_api_key_is_refused():
    with pytest.raises(ConfigError, match="server.api_key"):
        load_settings(env={}, overrides={"server": {"api_key": "short"}})
