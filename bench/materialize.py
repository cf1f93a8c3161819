"""Building an input root: 20,000 small distinct files in 2,000 directories, from a warm cache.

Setup: the blobs and the tree's Directory messages in a FilesystemStore (written straight into
its layout, then indexed by start()), a worker LocalCas over LocalStoreAccess(store) with
ensure() done for every file (so each file is a hardlink away), and the planned InputTree.

Timed, each into a fresh directory on the same file system (interleaved repetitions, medians):
  floor        os.mkdir + os.link loop over precomputed absolute path lists (the syscall floor)
  materialize  reexec.sandbox.input_root.build_input_root_sync(tree, dest, cache.path_str)
  copytree     shutil.copytree of an already materialized copy of the tree (copies bytes)
  cold         the executor's input path with an empty DirectoryCache: load_directories (fetch +
               parse 2,001 Directory messages) + plan_tree + entries + lease + ensure +
               build_input_root_sync in a worker thread
  warm         the same with the plan cache warm (load_directories + plan_tree skipped)

Targets: materialize within 1.5x of the floor; warm repeated tree within 1.2x (read here as: the
whole warm input path within 1.2x of build_input_root_sync alone, i.e. <= 20% on top of building
the tree; its ratio to the floor is printed too).

Usage: .venv/bin/python bench/materialize.py [--dirs 2000] [--files-per-dir 10] [--reps 5]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import trio
from _sched_common import BENCH_TMPDIR, banner, fs_create_cost, median, table, verdict

from reexec import fastpb
from reexec.cas.digest import Digest, DigestFunction
from reexec.cas.filesystem import FilesystemStore
from reexec.sandbox.cas_access import LocalStoreAccess
from reexec.sandbox.input_root import build_input_root_sync
from reexec.sandbox.local_cas import LocalCas
from reexec.sandbox.materialize import (
    DirectoryCache,
    InputTree,
    load_directories,
    plan_tree,
)

SHA = DigestFunction.SHA256


def _digest(data: bytes) -> Digest:
    return Digest(hashlib.sha256(data).hexdigest(), len(data), SHA)


def _store_blob(store_root: Path, data: bytes) -> Digest:
    """Write a blob straight into FilesystemStore's layout (indexed later by start())."""
    d = _digest(data)
    shard = store_root / "blobs" / "sha256" / d.hash[:2]
    shard.mkdir(parents=True, exist_ok=True)
    path = shard / f"{d.hash}-{d.size}"
    if not path.exists():
        path.write_bytes(data)
        os.chmod(path, 0o444)
    return d


def build_tree(store_root: Path, n_dirs: int, per_dir: int) -> Digest:
    """root -> T top directories -> S subdirectories each; `per_dir` files in every directory
    but the root: n_dirs directories, n_dirs * per_dir distinct small files (10% executable).
    T = 50 for the default 2,000 (each with 39 subdirectories), about sqrt(n_dirs) otherwise."""
    top = 50 if n_dirs == 2000 else max(1, round(n_dirs**0.5))
    sub_counts = [
        (n_dirs - top) // top + (1 if i < (n_dirs - top) % top else 0) for i in range(top)
    ]
    counter = 0

    def files_dir(subdirs: list[tuple[str, Digest]]) -> Digest:
        nonlocal counter
        d = fastpb.Directory()
        for j in range(per_dir):
            counter += 1
            data = f"file {counter}\n".encode() + os.urandom(16 + counter % 200)
            fd = _digest(data)
            _store_blob(store_root, data)
            node = d.files.add(name=f"f{j:02d}.txt", is_executable=counter % 10 == 0)
            node.digest.hash, node.digest.size_bytes = fd.hash, fd.size
        for name, sd in subdirs:
            node = d.directories.add(name=name)
            node.digest.hash, node.digest.size_bytes = sd.hash, sd.size
        return _store_blob(store_root, d.SerializeToString(deterministic=True))

    top_nodes = []
    for t in range(top):
        subs = [(f"s{s:03d}", files_dir([])) for s in range(sub_counts[t])]
        top_nodes.append((f"t{t:03d}", files_dir(subs)))
    root = fastpb.Directory()
    for name, sd in top_nodes:
        node = root.directories.add(name=name)
        node.digest.hash, node.digest.size_bytes = sd.hash, sd.size
    return _store_blob(store_root, root.SerializeToString(deterministic=True))


def floor_lists(
    tree: InputTree, cache: LocalCas, dest: Path
) -> tuple[list[str], list[tuple[str, str]]]:
    base = str(dest) + "/"
    dirs = [base + d for d in tree.dirs]
    links = [(str(cache.path(e)), base + rel) for rel, e in tree.files]
    return dirs, links


def floor(dirs: list[str], links: list[tuple[str, str]]) -> None:
    mkdir, link = os.mkdir, os.link
    for d in dirs:
        mkdir(d)
    for src, dst in links:
        link(src, dst)


async def input_path(
    root: Digest, access: LocalStoreAccess, dirs: DirectoryCache, cache: LocalCas, dest: Path
) -> None:
    """What ActionExecutor._run does for the inputs (minus progress reports and timestamps)."""
    key = (root, False)
    tree = dirs.plan(key)
    if tree is None:
        directories = await load_directories(root, access, dirs)
        tree = plan_tree(root, directories, False)
        dirs.put_plan(key, tree)
    entries = tree.entries()
    with cache.lease(entries):
        await cache.ensure(entries)
        await trio.to_thread.run_sync(build_input_root_sync, tree, dest, cache.path_str)


async def measure(
    where: str | None, args: argparse.Namespace, reps: int, copytree_reps: int, warmup: int
) -> dict[str, float]:
    """Medians (seconds) of each variant over `reps` repetitions after `warmup` dropped ones."""
    work = Path(tempfile.mkdtemp(prefix="reexec-bench-mat-", dir=where))
    print(
        f"\n-- under {work.parent} ({fs_create_cost_at(where):.0f} us CPU per 4 KiB file create "
        f"there); {args.dirs:,} dirs x {args.files_per_dir} files; {reps} reps --"
    )
    try:
        t0 = time.perf_counter()
        store_root = work / "cas"
        root = build_tree(store_root, args.dirs, args.files_per_dir)
        store = FilesystemStore(store_root, 1 << 40)
        await store.start()
        access = LocalStoreAccess(store)
        cache = LocalCas(work / "worker-cache", 1 << 40, access)
        await cache.start()
        dirs_cache = DirectoryCache()
        directories = await load_directories(root, access, dirs_cache)
        tree = plan_tree(root, directories)
        entries = tree.entries()
        t1 = time.perf_counter()
        await cache.ensure(entries)
        t2 = time.perf_counter()
        n_files, n_dirs = len(tree.files), len(tree.dirs)
        print(
            f"setup {t1 - t0:.1f}s; first ensure() of {len(entries):,} entries (hardlinks from "
            f"the store, {1e6 * (t2 - t1) / len(entries):.0f} us/entry) {t2 - t1:.1f}s; "
            f"tree: {n_dirs:,} dirs, {n_files:,} files",
            flush=True,
        )
        assert access.links == len(entries), (access.links, access.copies)

        # A materialized copy to copytree from.
        src_copy = work / "copy-src"
        src_copy.mkdir()
        build_input_root_sync(tree, src_copy, cache.path_str)

        warm_dirs = DirectoryCache()
        warm_dirs.put_plan((root, False), tree)
        kinds = ["floor", "materialize", "copytree", "cold", "warm"]
        times: dict[str, list[float]] = {k: [] for k in kinds}
        counter = 0
        for rep in range(warmup + reps):
            order = kinds[rep % 5 :] + kinds[: rep % 5]
            for kind in order:
                if kind == "copytree" and rep >= warmup + copytree_reps:
                    continue
                counter += 1
                dest = work / f"dest{counter}"
                if kind == "floor":
                    dirs, links = floor_lists(tree, cache, dest)
                    dest.mkdir()
                    t = time.perf_counter()
                    floor(dirs, links)
                elif kind == "materialize":
                    dest.mkdir()
                    t = time.perf_counter()
                    build_input_root_sync(tree, dest, cache.path_str)
                elif kind == "copytree":
                    t = time.perf_counter()
                    shutil.copytree(src_copy, dest)
                elif kind == "cold":
                    dest.mkdir()
                    t = time.perf_counter()
                    await input_path(root, access, DirectoryCache(), cache, dest)
                else:
                    dest.mkdir()
                    t = time.perf_counter()
                    await input_path(root, access, warm_dirs, cache, dest)
                if rep >= warmup:
                    times[kind].append(time.perf_counter() - t)
                # Not removed until the end: on this VM's ext4 (mounted with `discard`) mass
                # unlinks slow down the file system for a while and skew the next variant.
        assert warm_dirs.misses == 0

        med = {k: median(v) for k, v in times.items()}
        fl = med["floor"]
        print(
            table(
                ["variant", "ms", "us/file", "x floor", "x build_input_root_sync"],
                [
                    [k, 1000 * v, 1e6 * v / n_files, v / fl, v / med["materialize"]]
                    for k, v in med.items()
                ],
            )
        )
        print(
            "all repetitions (ms): "
            + "; ".join(f"{k} " + " ".join(f"{1000 * x:.0f}" for x in v) for k, v in times.items()),
            flush=True,
        )
        return med
    finally:
        # Cache and store files are read-only; their directories are not, so rmtree works.
        shutil.rmtree(work, ignore_errors=True)


def fs_create_cost_at(where: str | None) -> float:
    import _sched_common

    saved = _sched_common.BENCH_TMPDIR
    _sched_common.BENCH_TMPDIR = where
    try:
        return fs_create_cost()
    finally:
        _sched_common.BENCH_TMPDIR = saved


async def run(args: argparse.Namespace) -> None:
    banner("materialize an input tree from the worker cache")
    places: list[tuple[str, str | None, int, int, int]] = []
    if args.where in ("tmpfs", "both"):
        places.append(("tmpfs", "/dev/shm", args.reps, args.reps, 1))
    if args.where in ("disk", "both"):
        places.append(("disk", BENCH_TMPDIR, args.disk_reps, 1, 1))
    rows = []
    size = f"{args.dirs * args.files_per_dir:,} files / {args.dirs:,} dirs"
    for label, where, reps, copytree_reps, warmup in places:
        med = await measure(where, args, reps, copytree_reps, warmup)
        fl = med["floor"]
        r1 = med["materialize"] / fl
        r2 = med["warm"] / med["materialize"]
        rows += [
            [
                f"build_input_root_sync, {size} ({label})",
                f"{1000 * med['materialize']:.0f} ms",
                f"{1000 * fl:.0f} ms (mkdir+link floor)",
                f"{r1:.2f}",
                "<= 1.5",
                verdict(r1 <= 1.5),
            ],
            [
                f"warm repeated tree, full input path ({label})",
                f"{1000 * med['warm']:.0f} ms",
                f"{1000 * med['materialize']:.0f} ms (build_input_root_sync)",
                f"{r2:.2f} ({med['warm'] / fl:.2f} x floor)",
                "<= 1.2",
                verdict(r2 <= 1.2),
            ],
            [
                f"cold tree: load + parse + plan + materialize ({label})",
                f"{1000 * med['cold']:.0f} ms",
                f"{1000 * med['warm']:.0f} ms (warm)",
                f"{med['cold'] / med['warm']:.2f}",
                "-",
                "-",
            ],
            [
                f"shutil.copytree of the same tree ({label})",
                f"{1000 * med['copytree']:.0f} ms",
                f"{1000 * med['materialize']:.0f} ms (build_input_root_sync)",
                f"{med['copytree'] / med['materialize']:.2f}",
                "-",
                "-",
            ],
        ]
    print()
    print(table(["benchmark", "figure", "baseline", "ratio", "target", "met?"], rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dirs", type=int, default=2000)
    p.add_argument("--files-per-dir", type=int, default=10)
    p.add_argument("--reps", type=int, default=5, help="tmpfs repetitions (plus one warm-up)")
    p.add_argument("--disk-reps", type=int, default=3, help="repetitions on the disk")
    p.add_argument(
        "--where",
        choices=["tmpfs", "disk", "both"],
        default="both",
        help="tmpfs: /dev/shm (syscalls cheap, Python overhead visible); disk: BENCH_TMPDIR or "
        "the temp dir (the worker's real case; on this VM ext4 metadata ops cost ~0.1 ms each)",
    )
    trio.run(run, p.parse_args())


if __name__ == "__main__":
    main()
