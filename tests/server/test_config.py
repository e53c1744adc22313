"""Config: defaults < TOML < BACKBONE_* environment < overrides (flags); strict checking."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from server.config import Config, ConfigError, env_layer, load_config, parse_assignment, redacted
from server.main import add_serve_arguments, config_from_args


def write_toml(tmp_path, text: str):
    """A TOML file with ``text``."""
    path = tmp_path / "backbone.toml"
    path.write_text(text)
    return path


def serve_args(*argv: str) -> argparse.Namespace:
    """``serve`` arguments as the console command parses them."""
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args(list(argv))


def test_defaults_without_any_layer():
    config = load_config()
    assert config == Config()
    assert config.server.host == "127.0.0.1"
    assert config.server.port == 50051
    assert config.server.auth_token == ""


def test_each_layer_overrides_the_one_below(tmp_path):
    path = write_toml(
        tmp_path,
        "[server]\nport = 6000\nhost = '0.0.0.0'\ngrace_seconds = 3.5\n"
        "[embedding]\nmax_batch_size = 8\nmax_wait_ms = 1\n",
    )
    environ = {
        "BACKBONE_SERVER__PORT": "7000",
        "BACKBONE_EMBEDDING__MAX_BATCH_SIZE": "16",
        "BACKBONE_SEARCH__DURABLE": "false",
        "UNRELATED": "x",
        "BACKBONE_NO_SEPARATOR": "ignored: not a section__key variable",
    }
    overrides = {"server": {"port": "8000"}}

    file_only = load_config(path)
    assert (file_only.server.port, file_only.server.host) == (6000, "0.0.0.0")
    assert file_only.embedding.max_batch_size == 8
    assert file_only.embedding.max_wait_ms == 1.0  # TOML int read as the float field

    with_env = load_config(path, environ)
    assert with_env.server.port == 7000  # env beats TOML
    assert with_env.server.host == "0.0.0.0"  # TOML kept where env is silent
    assert with_env.server.grace_seconds == 3.5
    assert with_env.embedding.max_batch_size == 16
    assert with_env.search.durable is False

    full = load_config(path, environ, overrides)
    assert full.server.port == 8000  # flags beat env
    assert full.embedding.max_batch_size == 16
    # untouched fields keep their defaults
    assert full.rerank == Config().rerank


def test_flags_of_the_serve_command_win(tmp_path):
    path = write_toml(tmp_path, "[server]\nport = 6000\nhost = '10.0.0.1'\n")
    environ = {"BACKBONE_SERVER__PORT": "7000", "BACKBONE_EMBEDDING__MAX_INPUTS": "9"}
    args = serve_args(
        "embedding", "--config", str(path), "--port", "0", "--host", "127.0.0.2",
        "--set", "embedding.max_inputs=5", "--set", "server.log_level=debug",
    )
    config = config_from_args(args, environ)
    assert config.server.port == 0
    assert config.server.host == "127.0.0.2"
    assert config.embedding.max_inputs == 5
    assert config.server.log_level == "debug"
    # without flags the environment wins over the file
    config = config_from_args(serve_args("--config", str(path)), environ)
    assert (config.server.port, config.server.host) == (7000, "10.0.0.1")
    assert config.embedding.max_inputs == 9


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        load_config().server.port = 1  # type: ignore[misc]


def test_env_keys_are_case_insensitive_section_double_underscore_key():
    layer = env_layer({"BACKBONE_SERVER__MAX_MESSAGE_BYTES": "10", "backbone_x__y": "no"})
    assert layer == {"server": {"max_message_bytes": "10"}}


@pytest.mark.parametrize(
    "where",
    [
        {"toml": "[nosuchsection]\nx = 1\n"},
        {"toml": "[server]\nno_such_key = 1\n"},
        {"toml": "port = 1\n"},  # a key outside any section
        {"env": {"BACKBONE_NOSUCHSECTION__X": "1"}},
        {"env": {"BACKBONE_SERVER__NO_SUCH_KEY": "1"}},
        {"overrides": {"server": {"no_such_key": "1"}}},
        {"overrides": {"nosuchsection": {"x": "1"}}},
    ],
)
def test_unknown_section_or_key_is_rejected(tmp_path, where):
    path = write_toml(tmp_path, where["toml"]) if "toml" in where else None
    with pytest.raises(ConfigError):
        load_config(path, where.get("env"), where.get("overrides"))


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("server", "port", "fifty"),
        ("server", "port", "1.5"),
        ("server", "grace_seconds", "soon"),
        ("server", "log_payloads", "maybe"),
        ("embedding", "max_batch_size", ""),
        ("search", "durable", "2"),
    ],
)
def test_bad_types_from_text_are_rejected(section, key, value):
    with pytest.raises(ConfigError, match=f"{section}.{key}"):
        load_config(overrides={section: {key: value}})
    env = {f"BACKBONE_{section.upper()}__{key.upper()}": value}
    with pytest.raises(ConfigError, match=f"{section}.{key}"):
        load_config(environ=env)


@pytest.mark.parametrize(
    "toml",
    [
        "[server]\nport = 1.5\n",  # float for an int: no silent truncation
        "[server]\nport = true\n",  # bool for an int
        "[server]\nport = '50052'\n",  # a TOML string is not an integer
        "[server]\nhost = 127\n",  # int for a str
        "[server]\ngrace_seconds = 'ten'\n",
        "[server]\ngrace_seconds = false\n",  # bool for a float
        "[search]\ndurable = 1\n",  # int for a bool
        "[server]\nhost = ['a']\n",
        "[server]\nhost = {a = 1}\n",
    ],
)
def test_bad_types_in_toml_are_rejected(tmp_path, toml):
    with pytest.raises(ConfigError):
        load_config(write_toml(tmp_path, toml))


def test_malformed_toml_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError):
        load_config(write_toml(tmp_path, "[server\nport = \n"))
    with pytest.raises(ConfigError):
        load_config(write_toml(tmp_path, "server = 5\n"))  # a section that is not a table


def test_text_values_are_read_as_their_types():
    config = load_config(
        environ={
            "BACKBONE_SERVER__PORT": " 50060 ",
            "BACKBONE_SERVER__GRACE_SECONDS": "2.5",
            "BACKBONE_SERVER__LOG_PAYLOADS": "yes",
            "BACKBONE_SEARCH__DURABLE": "0",
        }
    )
    assert config.server.port == 50060
    assert config.server.grace_seconds == 2.5
    assert config.server.log_payloads is True
    assert config.search.durable is False


@pytest.mark.parametrize(
    "server",
    [
        {"tls_cert": "cert.pem"},  # cert without key
        {"tls_key": "key.pem"},  # key without cert
        {"tls_client_ca": "ca.pem"},  # mTLS without a server certificate
        {"port": "70000"},
        {"port": "-1"},
        {"max_message_bytes": "0"},  # a non-positive cap would mean "no limit" to gRPC
        {"max_message_bytes": "-1"},
        {"grace_seconds": "-1"},
        {"log_level": "chatty"},
    ],
)
def test_inconsistent_values_are_rejected(server):
    with pytest.raises(ConfigError):
        load_config(overrides={"server": server})


@pytest.mark.parametrize("embedding", [{"engine": "tensorflow"}, {"lanes": "-1"}])
def test_bad_embedding_engine_settings_are_rejected(embedding):
    with pytest.raises(ConfigError):
        load_config(overrides={"embedding": embedding})


def test_tls_cert_and_key_together_are_accepted():
    config = load_config(overrides={"server": {"tls_cert": "c.pem", "tls_key": "k.pem"}})
    assert (config.server.tls_cert, config.server.tls_key) == ("c.pem", "k.pem")


def test_parse_assignment():
    assert parse_assignment("embedding.max_batch_size=32") == ("embedding", "max_batch_size", "32")
    assert parse_assignment("server.auth_token=a=b") == ("server", "auth_token", "a=b")
    for bad in ("embedding.max_batch_size", "max_batch_size=3", ".x=1", "x.=1"):
        with pytest.raises(ConfigError):
            parse_assignment(bad)


def test_redaction_hides_the_auth_token_only():
    config = load_config(
        overrides={"server": {"auth_token": "s3cr3t-t0ken", "tls_cert": "c.pem", "tls_key": "k.pem"}}
    )
    shown = redacted(config)
    text = json.dumps(shown)
    assert "s3cr3t-t0ken" not in text
    assert shown["server"]["auth_token"] == "***"
    assert shown["server"]["tls_cert"] == "c.pem"  # paths are not secrets
    assert shown["server"]["port"] == 50051
    assert config.server.auth_token == "s3cr3t-t0ken"  # the config itself is untouched
    # an unset token stays visibly unset
    assert redacted(load_config())["server"]["auth_token"] == ""


def test_overrides_accept_typed_values_and_paths(tmp_path):
    config = load_config(
        overrides={"server": {"port": 0, "grace_seconds": 2, "log_payloads": True},
                   "search": {"data_dir": tmp_path}}
    )
    assert (config.server.port, config.server.grace_seconds) == (0, 2.0)
    assert isinstance(config.server.grace_seconds, float)
    assert config.server.log_payloads is True
    assert config.search.data_dir == str(tmp_path)
    with pytest.raises(ConfigError):
        load_config(overrides={"server": {"port": True}})
    with pytest.raises(ConfigError):
        load_config(overrides={"server": {"host": 5}})
