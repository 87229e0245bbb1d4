"""Settings: flag > environment > config.py > default, and exit 2 with one line on bad ones."""

from __future__ import annotations

import socket
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import redis
from harness import wait_until
from updater_fixtures import message, publish_all, run_cli, updater_process, wait_subscribed

from kv_updater.settings import SettingsError, UpdaterSettings, load_settings

ENV_KEYS = [
    "REDIS_URL", "CHANNEL", "STORED_CHANNEL", "VALIDATE", "KEY_PREFIX", "NAMESPACE",
    "MAX_MESSAGE_BYTES", "TYPE_PATTERN", "METRICS_PORT", "DEAD_LETTER", "LOG_LEVEL",
    "LOG_FORMAT", "CONFIG_FILE",
]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No setting from the developer's environment or working directory leaks in."""
    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def load(*argv: str) -> UpdaterSettings:
    return load_settings(UpdaterSettings, list(argv), "kv-updater")


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(f"config = {config!r}\n")
    return path


def test_defaults_are_the_designs() -> None:
    s = load()
    assert s.redis_url == "redis://localhost:6379/0"
    assert (s.channel, s.stored_channel) == ("update", "update:stored")
    assert s.validate_writes is True
    assert (s.key_prefix, s.namespace) == ("", "kvupdater:")
    assert s.max_message_bytes == 1_048_576
    assert s.type_pattern == "^[A-Za-z0-9_.:-]{1,200}$"
    assert (s.metrics_port, s.dead_letter) == (0, "")
    assert (s.log_level, s.log_format) == ("INFO", "text")


def test_the_seeds_config_py_in_the_working_directory_is_read(clean_env: Path) -> None:
    write_config(clean_env / "config.py", {
        "redis_url": "redis://redis.redis:6379/0", "channel": "update", "validate": False})
    s = load()
    assert s.redis_url == "redis://redis.redis:6379/0"
    assert s.validate_writes is False


def test_config_keys_are_case_insensitive(clean_env: Path) -> None:
    write_config(clean_env / "config.py", {"Channel": "c1", "VALIDATE": False})
    s = load()
    assert (s.channel, s.stored_channel, s.validate_writes) == ("c1", "c1:stored", False)


LAYERS = [
    # key, flag, env name, config value, env value, flag value, attribute, expected per layer
    ("channel", "--channel", "CHANNEL", "cfg", "env", "flag", "channel"),
    ("validate", None, "VALIDATE", False, "true", "--no-validate", "validate_writes"),
    ("max_message_bytes", "--max-message-bytes", "MAX_MESSAGE_BYTES", 1000, "2000", "3000",
     "max_message_bytes"),
    ("log_level", "--log-level", "LOG_LEVEL", "ERROR", "warning", "debug", "log_level"),
    ("metrics_port", "--metrics-port", "METRICS_PORT", 9001, "9002", "9003", "metrics_port"),
    ("key_prefix", "--key-prefix", "KEY_PREFIX", "c:", "e:", "f:", "key_prefix"),
    ("dead_letter", "--dead-letter", "DEAD_LETTER", "dl1", "dl2", "dl3", "dead_letter"),
]


@pytest.mark.parametrize(("key", "flag", "env", "cfg", "env_value", "flag_value", "attr"),
                         LAYERS, ids=[layer[0] for layer in LAYERS])
def test_flag_beats_env_beats_config_beats_default(
    monkeypatch: pytest.MonkeyPatch, clean_env: Path, key: str, flag: str | None, env: str,
    cfg: Any, env_value: str, flag_value: str, attr: str,
) -> None:
    default = getattr(load(), attr)
    write_config(clean_env / "config.py", {key: cfg})
    from_config = getattr(load(), attr)
    monkeypatch.setenv(env, env_value)
    from_env = getattr(load(), attr)
    argv = [flag_value] if flag is None else [flag, flag_value]
    from_flag = getattr(load(*argv), attr)
    layers = (default, from_config, from_env, from_flag)
    if isinstance(cfg, bool):  # a switch: each layer flips it
        assert layers == (True, False, True, False)
    else:
        assert len({repr(v) for v in layers}) == 4, layers
    assert str(from_config).lower() == str(cfg).lower()
    assert str(from_env).lower() == env_value.lower()
    if flag is not None:
        assert str(from_flag).lower() == flag_value.lower()


def test_config_path_flag_beats_config_file_env_beats_working_directory(
    monkeypatch: pytest.MonkeyPatch, clean_env: Path
) -> None:
    write_config(clean_env / "config.py", {"channel": "cwd"})
    assert load().channel == "cwd"
    other = write_config(clean_env / "other.py", {"channel": "env-file"})
    monkeypatch.setenv("CONFIG_FILE", str(other))
    assert load().channel == "env-file"
    flagged = write_config(clean_env / "flagged.py", {"channel": "flag-file"})
    assert load("--config", str(flagged)).channel == "flag-file"


def test_stored_channel_follows_the_channel_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHANNEL", "feed")
    assert load().stored_channel == "feed:stored"
    assert load("--stored-channel", "commits").stored_channel == "commits"


def test_an_explicit_config_file_that_is_missing_is_an_error() -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        load("--config", "/nonexistent/config.py")


# -- the real process: exit 2, one clear line ------------------------------------------
BAD = [
    ("url-scheme", ["--redis-url", "http://localhost:6379"], {}, "redis_url"),
    ("url-port", ["--redis-url", "redis://:s3cret@localhost:99999/0"], {}, "redis_url"),
    ("url-port-text", ["--redis-url", "redis://localhost:port/0"], {}, "redis_url"),
    ("url-env", [], {"REDIS_URL": "localhost:6379"}, "redis_url"),
    ("log-level", ["--log-level", "VERBOSE"], {}, "log_level"),
    ("log-level-env", [], {"LOG_LEVEL": "loud"}, "log_level"),
    ("log-format", ["--log-format", "xml"], {}, "log_format"),
    ("port-high", ["--metrics-port", "65536"], {}, "metrics_port"),
    ("port-negative", ["--metrics-port=-1"], {}, "metrics_port"),
    ("port-text", [], {"METRICS_PORT": "eighty"}, "metrics_port"),
    ("regex", ["--type-pattern", "[a-z"], {}, "type_pattern"),
    ("max-bytes", ["--max-message-bytes", "10"], {}, "max_message_bytes"),
    ("same-channels", ["--channel", "x", "--stored-channel", "x"], {}, "stored_channel"),
    ("validate", [], {"VALIDATE": "perhaps"}, "validate"),
    ("config-missing", ["--config", "/nonexistent/config.py"], {}, "config"),
    # Regression: the dead-letter XADD turned the instants hash into a stream, and every
    # later commit failed with WRONGTYPE (retried for ever, nothing committed again).
    ("dead-letter-instants", ["--dead-letter", "kvupdater:instants"], {}, "dead_letter"),
    ("dead-letter-seq", [], {"DEAD_LETTER": "ns:seq", "NAMESPACE": "ns:"}, "dead_letter"),
]


@pytest.mark.parametrize(("args", "env", "mentions"), [b[1:] for b in BAD],
                         ids=[b[0] for b in BAD])
def test_a_bad_setting_exits_2_with_one_clear_line(
    args: list[str], env: dict[str, str], mentions: str
) -> None:
    done = run_cli(args, env=env)
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("kv-updater: "), lines
    assert mentions in lines[0]
    assert "Traceback" not in done.stderr
    assert "s3cret" not in done.stderr  # a password in a bad URL is not echoed
    assert done.stdout == ""


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ("config = {'log_level': 'NOPE'}\n", "log_level"),
        ("config = {'metrics_port': 123456}\n", "metrics_port"),
        ("config = {\n", "failed to load"),
        ("settings = {'channel': 'x'}\n", "must define a dict"),
        ("raise RuntimeError('boom')\n", "boom"),
    ],
    ids=["level", "port", "syntax", "no-dict", "raises"],
)
def test_a_bad_config_py_exits_2_with_one_clear_line(
    clean_env: Path, source: str, problem: str
) -> None:
    (clean_env / "config.py").write_text(source)
    done = run_cli([], cwd=clean_env)
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("kv-updater: "), lines
    assert problem in lines[0], lines


def test_the_process_takes_config_py_then_env_then_flags(
    redis_url: str, r: redis.Redis, clean_env: Path
) -> None:
    """The whole precedence in one real process: each layer names another channel."""
    write_config(clean_env / "config.py", {"redis_url": redis_url, "channel": "from-config",
                                           "validate": True, "log_level": "WARNING"})
    runs = [
        ({}, [], "from-config"),
        ({"CHANNEL": "from-env", "LOG_LEVEL": "INFO"}, [], "from-env"),
        ({"CHANNEL": "from-env", "LOG_LEVEL": "INFO"}, ["--channel", "from-flag"], "from-flag"),
    ]
    for n, (env, args, channel) in enumerate(runs):
        with updater_process(redis_url, *args, env=env, cwd=clean_env) as svc:
            wait_subscribed(r, channel)
            publish_all(r, channel, [message(f"k{n}")])
            wait_until(partial(r.exists, f"k{n}"), 10, message=f"k{n} via {channel}")
            log = svc.log
        assert ("starting with" in log) is (n > 0), log  # WARNING from config.py hides INFO
        if n > 0:
            assert f"'channel': '{channel}'" in log
        assert svc.proc is not None
        assert svc.proc.returncode == 0


def test_a_metrics_port_in_use_exits_2_with_one_line() -> None:
    """Regression: a busy metrics port ended the process with a traceback and exit 1."""
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = run_cli(["--metrics-port", str(port), "--redis-url", "redis://127.0.0.1:1/0"])
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert lines == [f"kv-updater: bad setting metrics_port: cannot listen on 0.0.0.0:{port} "
                     "(Address already in use)"], done.stderr


@pytest.mark.parametrize(
    "url",
    [
        "redis://user:hunter2@redis.example:6379/0",
        "redis://:hunter2@redis.example",
        "rediss://user:hun@ter2@redis.example:6380/0",  # an unencoded @ in the password
        "redis://redis.example:6379/0?password=hunter2",
        "redis://user@redis.example/0?db=1&password=hunter2&socket_timeout=1",
        "unix://:hunter2@/run/redis.sock?db=0",
        "unix:///run/redis.sock?db=0&password=hunter2",
    ],
)
def test_the_start_line_masks_a_password_in_any_url_form(url: str) -> None:
    """Regression: a password given as ?password= (which redis-py honours) was logged."""
    shown = UpdaterSettings(redis_url=url).redacted()["redis_url"]
    assert "hunter2" not in shown
    assert "ter2" not in shown
    assert "***" in shown
    assert shown.split("//")[0] == url.split("//")[0]


def test_the_console_script_and_the_module_both_run() -> None:
    script = Path(sys.executable).with_name("kv-updater")
    assert script.exists()
    for command in ([str(script), "--help"], [sys.executable, "-m", "kv_updater", "--help"]):
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 0, done
        assert "--redis-url" in done.stdout
        assert "--dead-letter" in done.stdout
