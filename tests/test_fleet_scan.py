"""The fleet's walk of a local root (DESIGN.md §13, issue #31): what it counts is what the
folder's own listing counts — the same names, the same bytes, the same newest id — over a
root that holds everything a listing ignores, and it never reads a sidecar, never follows
a symlink, never opens what it stats, and hands its folders over in bounded batches."""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path

import pytest

from storage_backends import FolderSummary, SystemFolder
from storage_backends.ids import (
    SUFFIXES,
    is_folder_name,
    match_stored_backup_name,
    new_uuid7,
    normalize_backup_id,
)
from storage_backends.local import ROOT_MARKER, SIDECAR_SUFFIX
from storage_backends.local import fs as local_fs
from storage_backends.local import scan as local_scan
from storage_backends.s3 import S3Config, create_store

from .conftest import S3Server
from .support import S3Harness, s3_settings

SIDECAR = b'{"filename":"b.tar.gz","sha256":"","mimetype":"application/gzip"}'


def backup_id(ms: int, suffix: str = ".tar.gz") -> str:
    return new_uuid7(ms) + suffix


def put(folder: Path, name: str, size: int, sidecar: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(b"x" * size)
    if sidecar:
        (folder / (name + SIDECAR_SUFFIX)).write_bytes(SIDECAR)


def walked(root: Path) -> list[tuple[SystemFolder, int, int, str]]:
    return [
        (s.folder, s.count, s.total_bytes, s.newest_id)
        for batch in local_scan.walk(root)
        for s in batch
    ]


def listed(root: Path) -> list[tuple[SystemFolder, int, int, str]]:
    """What the store's listing of each folder (names and sizes, no sidecar) says, over
    every `{org}/{key}` folder reached without a symlink through names the directory gives."""
    found = []
    for org in sorted(p.name for p in root.iterdir() if is_folder_name(p.name)):
        if (root / org).is_symlink() or not (root / org).is_dir():
            continue
        for key in sorted(p.name for p in (root / org).iterdir() if is_folder_name(p.name)):
            if (root / org / key).is_symlink() or not (root / org / key).is_dir():
                continue
            folder = SystemFolder(org, key)
            entries = local_fs.list_entries(root, folder)
            if entries:
                newest = max(e.id for e in entries)
                found.append((folder, len(entries), sum(e.size for e in entries), newest))
    return found


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "backups"
    root.mkdir()
    (root / ROOT_MARKER).write_text("test\n")
    return root


def test_the_walk_counts_what_the_listing_counts_and_nothing_else(
    root: Path, tmp_path: Path
) -> None:
    ms = 1_700_000_000_000
    folder = root / "org_a" / "KEY-1"
    ids = [backup_id(ms + i * 1000, suffix) for i, suffix in enumerate(("", *SUFFIXES))]
    for i, name in enumerate(ids):
        put(folder, name, 10 + i)
    newest = ids[-1]
    # newest by id, never by the file's time: the newest id carries the oldest mtime
    os.utime(folder / newest, (1, 1))
    odd = [
        ids[1].upper(),  # the listing keeps an id only as `normalize_backup_id` returns it
        backup_id(ms + 99_000, ".zip"),  # an unknown suffix
        backup_id(ms + 99_000) + ".tmp",
        "." + backup_id(ms + 99_000),  # hidden: an upload in flight
        backup_id(ms + 99_000) + "\n",  # a name with a newline in it
        backup_id(ms + 99_000)[:-1],  # one digit short
        new_uuid7(ms)[:14] + "4" + new_uuid7(ms)[15:],  # not a UUIDv7
        ".retention.lock",
        "notes.txt",
    ]
    for name in odd:
        put(folder, name, 1000, sidecar=False)
    os.mkdir(folder / backup_id(ms + 98_000))  # a folder named like a backup
    os.mkfifo(folder / backup_id(ms + 97_000))  # a FIFO: stat'ed, never opened
    victim = tmp_path / "victim.tar.gz"
    victim.write_bytes(b"v" * 5000)
    os.symlink(victim, folder / backup_id(ms + 96_000))  # never followed
    os.symlink(folder / ids[0], folder / backup_id(ms + 95_000))
    not_utf8 = os.fsencode(folder) + b"/" + os.fsencode(backup_id(ms + 94_000))[:-1] + b"\xff"
    with open(not_utf8, "wb"):
        pass
    # a second organization, a folder that holds nothing a listing keeps, and everything
    # beside the folders that is no folder of a system
    other = backup_id(ms)
    put(root / "org_b" / "KEY-2", other, 7)
    put(root / "org_b" / "KEY-EMPTY", "notes.txt", 3, sidecar=False)
    os.symlink(root / "org_a", root / "org_link")  # an organization through a symlink
    os.symlink(folder, root / "org_b" / "KEY-LINK")  # a system folder through a symlink
    put(root / "org_b", "KEY-FILE", 3, sidecar=False)  # a file where a folder would be
    put(root / ".state" / "KEY-3", backup_id(ms), 3)  # hidden
    put(root / "bad name" / "KEY-4", backup_id(ms), 3)  # not a name the directory gives
    put(root / "org_b" / "KEY-2" / "deeper", backup_id(ms), 3)  # below a system folder

    expected = [
        (SystemFolder("org_a", "KEY-1"), len(ids), sum(10 + i for i in range(len(ids))), newest),
        (SystemFolder("org_b", "KEY-2"), 1, 7, other),
    ]
    assert walked(root) == expected
    assert listed(root) == expected  # the listing's own semantics, folder by folder


def test_the_names_it_keeps_are_exactly_the_listings() -> None:
    """The stored-name pattern the walk and the listing use, against `normalize_backup_id`,
    over near misses of each part."""
    good = new_uuid7(1_700_000_000_000)
    names = [good, good.upper(), good + "\n", "x" + good, good + "x", good[:-1]]
    names += [good + s for s in SUFFIXES] + [good + s.upper() for s in SUFFIXES]
    names += [good + s + SIDECAR_SUFFIX for s in ("", *SUFFIXES)]
    names += [good[:i] + c + good[i + 1 :] for i in range(len(good)) for c in "07a8gF-_"]
    for name in names:
        kept = not name.endswith(SIDECAR_SUFFIX) and normalize_backup_id(name) == name
        assert bool(match_stored_backup_name(name)) == kept, repr(name)


def test_no_sidecar_is_read(root: Path) -> None:
    """Sidecars that would block any reader (FIFOs): the walk ends all the same."""
    folder = root / "org_a" / "KEY-1"
    name = backup_id(1_700_000_000_000)
    put(folder, name, 4, sidecar=False)
    os.mkfifo(folder / (name + SIDECAR_SUFFIX))
    result: list[list[tuple[SystemFolder, int, int, str]]] = []
    walker = threading.Thread(target=lambda: result.append(walked(root)), daemon=True)
    walker.start()
    walker.join(10)
    assert result == [[(SystemFolder("org_a", "KEY-1"), 1, 4, name)]]


def test_batches_stay_bounded_by_folders_and_by_backups(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ms = 1_700_000_000_000
    for f in range(7):
        for b in range(f + 1):
            put(root / f"org_{f % 2}" / f"KEY-{f}", backup_id(ms + b), 1)
    everything = walked(root)
    assert len(everything) == 7
    monkeypatch.setattr(local_scan, "BATCH_FOLDERS", 2)
    monkeypatch.setattr(local_scan, "BATCH_NAMES", 5)
    batches: list[list[FolderSummary]] = list(local_scan.walk(root))
    assert [(s.folder, s.count, s.total_bytes, s.newest_id) for b in batches for s in b] == (
        everything
    )
    for batch in batches[:-1]:
        # a batch ends at the first folder that reaches either bound
        assert len(batch) <= 2
        assert sum(s.count for s in batch[:-1]) < 5


async def test_the_bucket_scan_sums_each_system_folder_once(s3_server: S3Server) -> None:
    """One listing of the prefix: a folder's keys stay one folder around deeper keys that
    sort among them, and nothing outside `{org}/{key}/{id}` counts — nor does a key XML
    cannot carry stop the scan (the keys come URL-encoded)."""
    bucket = f"scan-{uuid.uuid4().hex[:12]}"
    harness = S3Harness(s3_server.endpoint, bucket, prefix="tenant/")
    early, late = backup_id(1_700_000_000_000), backup_id(0xF000_0000_0000)  # "0…" < "d" < "f…"
    harness.put_key(f"org_a/KEY-1/{early}", b"x" * 10)
    harness.put_key(f"org_a/KEY-1/deeper/{backup_id(1_700_000_000_000)}", b"x" * 100)
    harness.put_key(f"org_a/KEY-1/{late}", b"x" * 20)
    harness.put_key(f"org_a/KEY-1/{early}{SIDECAR_SUFFIX}", b"x" * 100)
    harness.put_key(f"org_a/KEY-1/{early.upper()}", b"x" * 100)
    harness.put_key("org_a/KEY-1/odd \x01 & + % name", b"x" * 100)
    harness.put_key(f"org_a/{early}", b"x" * 100)  # shallower
    harness.put_key(early, b"x" * 100)
    harness.put_key(f".state/KEY-1/{early}", b"x" * 100)
    harness.put_key(f"org_b/KEY-2/{early}", b"x" * 7)
    harness.put_key(f"org_b/bad key/{early}", b"x" * 100)
    harness.client.put_object(Bucket=bucket, Key=f"other/org_a/KEY-1/{early}", Body=b"x" * 100)
    store = create_store(S3Config(**s3_settings(s3_server.endpoint, bucket, "tenant/")), 30.0)
    await store.start()
    try:
        batches = [batch async for batch in store.folder_summaries()]
    finally:
        await store.close()
    assert [(s.folder, s.count, s.total_bytes, s.newest_id) for b in batches for s in b] == [
        (SystemFolder("org_a", "KEY-1"), 2, 30, late),
        (SystemFolder("org_b", "KEY-2"), 1, 7, early),
    ]
