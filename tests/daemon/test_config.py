"""Daemon configuration: decoding, defaults and error messages (reexec.daemon.config)."""

from __future__ import annotations

from pathlib import Path

import pytest

from reexec.cas.config import (
    CompletenessCheckingActionCacheConfig,
    FastSlowStoreConfig,
    FilesystemActionCacheConfig,
    FilesystemStoreConfig,
    MemoryActionCacheConfig,
    MemoryStoreConfig,
    VerifyStoreConfig,
)
from reexec.daemon.config import (
    Config,
    ConfigError,
    LogConfig,
    ServerConfig,
    TlsConfig,
    load_config,
    parse_listen,
    parse_size,
)

# The documented defaults, spelled out: must decode to exactly Config().
DEFAULTS_TOML = """
data_dir = "./reexec-data"

[server]
listen = ["127.0.0.1:8980"]
instances = []
grace_period_s = 30.0
max_batch_total_size_bytes = "4032KiB"
max_inline_bytes = "1MiB"
upload_idle_timeout_s = 600.0
ac_allow_updates = true

[log]
level = "info"
format = "text"

[cas]
type = "verify"
inner = { type = "filesystem", path = "cas", max_bytes = "10GiB", fsync = false }

[action_cache]
type = "completeness_checking"
inner = { type = "filesystem", path = "ac", max_bytes = "1GiB" }
"""

EXAMPLES: dict[str, tuple[str, Config]] = {
    "empty": ("", Config()),
    "memory only": (
        """
        data_dir = "/var/lib/reexec"
        [server]
        listen = ["0.0.0.0:8980", "[::]:8981"]
        instances = ["main", "ci/linux"]
        [log]
        level = "debug"
        format = "json"
        [cas]
        type = "memory"
        max_bytes = "2GiB"
        [action_cache]
        type = "memory"
        max_bytes = 1048576
        """,
        Config(
            data_dir="/var/lib/reexec",
            server=ServerConfig(
                listen=["0.0.0.0:8980", "[::]:8981"], instances=["main", "ci/linux"]
            ),
            log=LogConfig(level="debug", format="json"),
            cas=MemoryStoreConfig(max_bytes="2GiB"),
            action_cache=MemoryActionCacheConfig(max_bytes=1048576),
        ),
    ),
    "fast_slow with tables": (
        """
        [cas]
        type = "verify"
        [cas.inner]
        type = "fast_slow"
        [cas.inner.fast]
        type = "memory"
        max_bytes = "512MiB"
        [cas.inner.slow]
        type = "filesystem"
        path = "/srv/cas"
        max_bytes = "100GB"
        fsync = true
        [action_cache]
        type = "completeness_checking"
        inner = { type = "filesystem", path = "/srv/ac" }
        """,
        Config(
            cas=VerifyStoreConfig(
                inner=FastSlowStoreConfig(
                    fast=MemoryStoreConfig(max_bytes="512MiB"),
                    slow=FilesystemStoreConfig(path="/srv/cas", max_bytes="100GB", fsync=True),
                )
            ),
            action_cache=CompletenessCheckingActionCacheConfig(
                inner=FilesystemActionCacheConfig(path="/srv/ac")
            ),
        ),
    ),
    "tls and server knobs": (
        """
        [server]
        listen = ["127.0.0.1:0"]
        grace_period_s = 0
        upload_idle_timeout_s = 5.5
        ac_allow_updates = false
        max_batch_total_size_bytes = 65536
        max_inline_bytes = "0"
        [server.tls]
        cert = "server.pem"
        key = "server.key"
        client_ca = "ca.pem"
        """,
        Config(
            server=ServerConfig(
                listen=["127.0.0.1:0"],
                grace_period_s=0,
                upload_idle_timeout_s=5.5,
                ac_allow_updates=False,
                max_batch_total_size_bytes=65536,
                max_inline_bytes="0",
                tls=TlsConfig(cert="server.pem", key="server.key", client_ca="ca.pem"),
            )
        ),
    ),
    "defaults spelled out": (DEFAULTS_TOML, Config()),
}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "reexec.toml"
    path.write_text("\n".join(line.strip() for line in text.splitlines()) + "\n")
    return path


def error_for(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: "), msg
    return msg[len(f"{path}: ") :]


def test_embedded_default_is_config() -> None:
    assert load_config(None) == Config()
    c = Config()
    assert c.cas == VerifyStoreConfig(inner=FilesystemStoreConfig())
    assert c.action_cache == CompletenessCheckingActionCacheConfig(
        inner=FilesystemActionCacheConfig()
    )
    assert c.server.listen == ["127.0.0.1:8980"]
    assert c.server.tls is None


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_examples_decode(tmp_path: Path, name: str) -> None:
    text, expected = EXAMPLES[name]
    assert load_config(write(tmp_path, text)) == expected


def test_unknown_top_level_key(tmp_path: Path) -> None:
    msg = error_for(tmp_path, 'data_dir = "x"\nbogus = 1\n')
    assert msg == (
        "top level: unknown key 'bogus'; allowed keys: data_dir, server, log, cas, action_cache, scheduler, worker, status"
    )


def test_unknown_key_in_section(tmp_path: Path) -> None:
    msg = error_for(tmp_path, "[server]\nlisten_on = ['x:1']\n")
    assert msg.startswith("server: unknown key 'listen_on'; allowed keys: listen, instances,")
    msg = error_for(tmp_path, "[server.tls]\ncert = 'a'\nkey = 'b'\nca = 'c'\n")
    assert msg == "server.tls: unknown key 'ca'; allowed keys: cert, key, client_ca"


def test_unknown_key_in_tagged_union_names_the_chosen_members_keys(tmp_path: Path) -> None:
    msg = error_for(
        tmp_path,
        """
        [cas]
        type = "fast_slow"
        fast = { type = "memory" }
        slow = { type = "filesystem", max_size = "1GB" }
        """,
    )
    assert (
        msg
        == "cas.slow: unknown key 'max_size'; allowed keys: type, path, max_bytes, fsync, max_blob_fraction"
    )
    msg = error_for(tmp_path, "[cas]\ntype = 'memory'\npath = 'x'\n")
    assert msg == "cas: unknown key 'path'; allowed keys: type, max_bytes, max_blob_fraction"
    msg = error_for(
        tmp_path, "[action_cache]\ntype = 'completeness_checking'\ninner = {type='memory', x=1}\n"
    )
    assert msg == "action_cache.inner: unknown key 'x'; allowed keys: type, max_bytes"


def test_bad_type_tag(tmp_path: Path) -> None:
    stores = "allowed types: memory, filesystem, verify, fast_slow, grpc, shard, size_partitioning"
    assert error_for(tmp_path, "[cas]\ntype = 's3'\n") == f"cas.type: invalid value 's3'; {stores}"
    msg = error_for(tmp_path, "[cas]\ntype = 'verify'\ninner = { type = 'redis' }\n")
    assert msg == f"cas.inner.type: invalid value 'redis'; {stores}"
    msg = error_for(tmp_path, "[action_cache]\ntype = 'verify'\n")
    assert msg == (
        "action_cache.type: invalid value 'verify'; "
        "allowed types: memory, filesystem, completeness_checking, grpc, redis"
    )
    msg = error_for(tmp_path, "[cas]\nmax_bytes = '1GB'\n")
    assert msg == f"cas: missing key 'type'; {stores}"


def test_missing_required_field(tmp_path: Path) -> None:
    msg = error_for(tmp_path, "[cas]\ntype = 'fast_slow'\nfast = { type = 'memory' }\n")
    assert msg == "cas: Object missing required field `slow`"


def test_bad_enum_value(tmp_path: Path) -> None:
    msg = error_for(tmp_path, "[log]\nlevel = 'verbose'\n")
    assert msg == (
        "log.level: Invalid enum value 'verbose'; allowed values: 'debug', 'info', 'warning', 'error'"
    )
    msg = error_for(tmp_path, "[log]\nformat = 'xml'\n")
    assert msg == "log.format: Invalid enum value 'xml'; allowed values: 'text', 'json'"


def test_wrong_value_type(tmp_path: Path) -> None:
    assert error_for(tmp_path, "data_dir = 5\n") == "data_dir: Expected `str`, got `int`"
    assert error_for(tmp_path, "[server]\nlisten = 'a:1'\n") == (
        "server.listen: Expected `array`, got `str`"
    )


def test_bad_size_string(tmp_path: Path) -> None:
    msg = error_for(tmp_path, "[cas]\ntype = 'memory'\nmax_bytes = '10 parsecs'\n")
    assert (
        msg
        == "cas.max_bytes: size '10 parsecs' is not a number of bytes like 1048576, '512MiB' or '10GB'"
    )
    msg = error_for(
        tmp_path,
        "[cas]\ntype='fast_slow'\nfast={type='memory', max_bytes=-1}\nslow={type='memory'}\n",
    )
    assert msg == "cas.fast.max_bytes: size -1 is negative"
    msg = error_for(tmp_path, "[server]\nmax_inline_bytes = '1 MiBs'\n")
    assert msg.startswith("server.max_inline_bytes: size '1 MiBs' is not a number of bytes")


@pytest.mark.parametrize(
    ("listen", "needle"),
    [
        ("localhost", "'localhost' is not host:port"),
        (":8980", "':8980' is not host:port"),
        ("host:", "'host:' is not host:port"),
        ("host:http", "'host:http' is not host:port"),
        ("host:70000", "port 70000 is out of range"),
    ],
)
def test_bad_listen_address(tmp_path: Path, listen: str, needle: str) -> None:
    msg = error_for(tmp_path, f"[server]\nlisten = ['127.0.0.1:1', '{listen}']\n")
    assert msg.startswith("server.listen[1]: ")
    assert needle in msg


def test_empty_listen(tmp_path: Path) -> None:
    assert error_for(tmp_path, "[server]\nlisten = []\n") == (
        "server.listen: at least one address is required"
    )


@pytest.mark.parametrize("key", ["grace_period_s", "upload_idle_timeout_s"])
def test_negative_or_nan_timeout(tmp_path: Path, key: str) -> None:
    assert error_for(tmp_path, f"[server]\n{key} = -0.5\n") == f"server.{key}: must not be negative"
    assert error_for(tmp_path, f"[server]\n{key} = nan\n") == (
        f"server.{key}: must be a number of seconds, not nan"
    )


def test_invalid_toml_and_unreadable_file(tmp_path: Path) -> None:
    assert error_for(tmp_path, "x = [\n").startswith("not valid TOML: ")
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as e:
        load_config(missing)
    assert str(e.value).startswith(f"{missing}: cannot read config file: ")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (4096, 4096),
        ("4096", 4096),
        (" 4096 ", 4096),
        ("1B", 1),
        ("1b", 1),
        ("1K", 1000),
        ("1KB", 1000),
        ("1KiB", 1024),
        ("1kib", 1024),
        ("1Ki", 1024),
        ("512MiB", 512 * 1024**2),
        ("10GB", 10 * 1000**3),
        ("10 GB", 10 * 1000**3),
        ("1.5GiB", 1536 * 1024**2),
        ("2TiB", 2 * 1024**4),
        ("3T", 3 * 1000**4),
        ("0MiB", 0),
    ],
)
def test_parse_size(value: int | str, expected: int) -> None:
    assert parse_size(value) == expected


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        (-1, "size -1 is negative"),
        ("-1", "is not a number of bytes"),
        ("", "is not a number of bytes"),
        ("MiB", "is not a number of bytes"),
        ("1 XB", "is not a number of bytes"),
        ("1iB", "is not a number of bytes"),
        ("1.2.3", "is not a number of bytes"),
        ("1e9", "is not a number of bytes"),
        ("1 KiBB", "is not a number of bytes"),
    ],
)
def test_parse_size_rejects(value: int | str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        parse_size(value)


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:8980") == ("127.0.0.1", 8980)
    assert parse_listen("[::1]:0") == ("::1", 0)
    assert parse_listen("example.com:65535") == ("example.com", 65535)
    with pytest.raises(ValueError, match="out of range"):
        parse_listen("h:65536")


def test_scale_out_stores_decode_and_build(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        """
        [cas]
        type = "size_partitioning"
        threshold = "64KiB"
        small = { type = "memory", max_bytes = "1GiB" }
        [cas.large]
        type = "shard"
        [[cas.large.shards]]
        name = "storage-a"
        store = { type = "grpc", url = "grpc://10.0.0.1:8980", timeout_s = 30 }
        [[cas.large.shards]]
        name = "storage-b"
        weight = 2
        store = { type = "grpc", url = "grpcs://storage-b.example:8980", instance_name = "main" }
        """
    )
    config = load_config(path)
    assert config.cas.large.shards[1].weight == 2  # type: ignore[union-attr]
    assert config.cas.large.shards[1].store.instance_name == "main"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("shards", "needle"),
    [
        ("shards = []", "cas.shards: at least one shard is required"),
        (
            'shards = [{ name = "a", store = { type = "memory" } }, '
            '{ name = "a", store = { type = "memory" } }]',
            "cas.shards[1].name: shard names must be unique",
        ),
        (
            'shards = [{ name = "a", weight = 0, store = { type = "memory" } }]',
            "cas.shards[0].weight: must be a positive number",
        ),
        (
            'shards = [{ name = "a", store = { type = "grpc", url = "http://x:1" } }]',
            "cas.shards[0].store.url: 'http://x:1' is not grpc://HOST:PORT",
        ),
    ],
)
def test_shard_store_errors_name_the_key(tmp_path: Path, shards: str, needle: str) -> None:
    msg = error_for(tmp_path, f'[cas]\ntype = "shard"\n{shards}\n')
    assert needle in msg
