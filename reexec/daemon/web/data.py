"""REAPI messages decoded into plain dicts for the web UI's templates.

Pure functions over bytes, except `fetch`, which reads a blob from the CAS with a size cap.
Nothing here decides what may be shown; `pages.py` does (blob contents only where the config
allows them).
"""

from __future__ import annotations

from typing import Any

from reexec import fastpb
from reexec.cas.digest import Digest, DigestFunction, digest_of
from reexec.cas.store import BlobNotFound, Store


def digest_dict(d: Any) -> dict[str, Any]:
    return {"hash": d.hash, "size": d.size_bytes}


async def fetch(cas: Store | None, digest: Digest, limit: int) -> tuple[bytes | None, str]:
    """The blob, or None and why not ("missing", "too large", "no CAS here")."""
    if cas is None:
        return None, "no CAS on this daemon"
    if digest.size > limit:
        return None, f"too large to show ({digest.size} bytes > {limit})"
    try:
        return await cas.get_bytes(digest), ""
    except BlobNotFound:
        return None, "not in the CAS (expired or never uploaded)"


async def fetch_head(cas: Store, digest: Digest, limit: int) -> tuple[bytes | None, str]:
    """The first `limit` bytes of a blob (for a log too large to show whole)."""
    parts: list[bytes] = []
    got = 0
    try:
        async with cas.open_read(digest) as reader:
            while got < limit and (chunk := await reader.read(limit - got)):
                parts.append(chunk)
                got += len(chunk)
    except BlobNotFound:
        return None, "not in the CAS (expired or never uploaded)"
    return b"".join(parts), ""


def _platform(p: Any) -> list[tuple[str, str]]:
    return [(prop.name, prop.value) for prop in p.properties]


def decode_action(data: bytes) -> dict[str, Any]:
    a = fastpb.Action()
    a.MergeFromString(data)
    return {
        "command": digest_dict(a.command_digest),
        "input_root": digest_dict(a.input_root_digest),
        "timeout_s": a.timeout.seconds + a.timeout.nanos / 1e9 if a.HasField("timeout") else None,
        "do_not_cache": a.do_not_cache,
        "salt_size": len(a.salt),
        "platform": _platform(a.platform),
    }


def decode_command(data: bytes) -> dict[str, Any]:
    c = fastpb.Command()
    c.MergeFromString(data)
    return {
        "arguments": list(c.arguments),
        "environment": [(e.name, e.value) for e in c.environment_variables],
        "working_directory": c.working_directory,
        "output_files": list(c.output_files),
        "output_directories": list(c.output_directories),
        "output_paths": list(c.output_paths),
        "platform": _platform(c.platform),
    }


def decode_directory(data: bytes) -> dict[str, Any]:
    d = fastpb.Directory()
    d.MergeFromString(data)
    return _directory(d)


def _directory(d: Any) -> dict[str, Any]:
    return {
        "directories": [(n.name, digest_dict(n.digest)) for n in d.directories],
        "files": [(n.name, digest_dict(n.digest), n.is_executable) for n in d.files],
        "symlinks": [(n.name, n.target) for n in d.symlinks],
    }


def decode_tree(data: bytes, function: DigestFunction) -> dict[str, Any]:
    """A Tree's root and its children, each child keyed by its digest (as DirectoryNodes
    name them) so the template can nest them."""
    t = fastpb.Tree()
    t.MergeFromString(data)
    children = {}
    for child in t.children:
        d = digest_of(child.SerializeToString(), function)
        children[f"{d.hash}/{d.size}"] = _directory(child)
    return {"root": _directory(t.root), "children": children}


def _seconds(ts: Any) -> float:
    return ts.seconds + ts.nanos / 1e9


# (label, start field, end field) of ExecutedActionMetadata, in the order they happen.
PHASES = (
    ("queued", "queued_timestamp", "worker_start_timestamp"),
    ("worker", "worker_start_timestamp", "worker_completed_timestamp"),
    ("input fetch", "input_fetch_start_timestamp", "input_fetch_completed_timestamp"),
    ("execution", "execution_start_timestamp", "execution_completed_timestamp"),
    ("output upload", "output_upload_start_timestamp", "output_upload_completed_timestamp"),
)


def decode_result(data: bytes) -> dict[str, Any]:
    r = fastpb.ActionResult()
    r.MergeFromString(data)
    meta = r.execution_metadata
    phases = []
    for label, start, end in PHASES:
        if meta.HasField(start) and meta.HasField(end):
            s, e = _seconds(getattr(meta, start)), _seconds(getattr(meta, end))
            if s > 0 and e >= s:
                phases.append((label, s, e))
    return {
        "exit_code": r.exit_code,
        "output_files": [(f.path, digest_dict(f.digest), f.is_executable) for f in r.output_files],
        "output_directories": [(d.path, digest_dict(d.tree_digest)) for d in r.output_directories],
        "output_symlinks": [
            (s.path, s.target)
            for s in (*r.output_symlinks, *r.output_file_symlinks, *r.output_directory_symlinks)
        ],
        "stdout_raw": bytes(r.stdout_raw),
        "stderr_raw": bytes(r.stderr_raw),
        "stdout": digest_dict(r.stdout_digest) if r.HasField("stdout_digest") else None,
        "stderr": digest_dict(r.stderr_digest) if r.HasField("stderr_digest") else None,
        "worker": meta.worker,
        "phases": phases,
    }


def as_text(data: bytes) -> str:
    """Bytes shown as text: UTF-8 with undecodable bytes replaced (escaping happens later)."""
    return data.decode("utf-8", errors="replace")


__all__ = [
    "as_text",
    "decode_action",
    "decode_command",
    "decode_directory",
    "decode_result",
    "decode_tree",
    "digest_dict",
    "fetch",
    "fetch_head",
]
