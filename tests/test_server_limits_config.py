"""Config checks of the [server] limits added for issue 9."""

from __future__ import annotations

import pytest

from reexec.daemon.config import ConfigError, load_config


def _load(tmp_path, server: str):
    path = tmp_path / "c.toml"
    path.write_text(f"[server]\n{server}\n")
    return load_config(path)


def test_defaults(tmp_path):
    s = _load(tmp_path, "").server
    assert s.max_receive_message_bytes == 0
    assert s.max_connections == 0
    assert s.connection_idle_timeout_s == 300.0
    assert s.max_open_uploads == 512
    assert s.allow_list_operations is False


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ('max_receive_message_bytes = "1MiB"', "below max_batch_total_size_bytes"),
        ('max_receive_message_bytes = "lots"', "server.max_receive_message_bytes"),
        ("max_connections = -1", "must not be negative"),
        ("max_open_uploads = 0", "at least 1"),
        ("connection_idle_timeout_s = -5", "must not be negative"),
        ("connection_idle_timeout_s = nan", "not nan"),
    ],
)
def test_bad_values_are_named(tmp_path, line, fragment):
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, line)
    assert fragment in str(e.value)


def test_valid_values(tmp_path):
    s = _load(
        tmp_path,
        'max_receive_message_bytes = "16MiB"\nmax_connections = 100\n'
        "connection_idle_timeout_s = 0\nmax_open_uploads = 10\nallow_list_operations = true",
    ).server
    assert (s.max_connections, s.max_open_uploads, s.allow_list_operations) == (100, 10, True)
