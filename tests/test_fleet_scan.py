"""The fleet's walk of a local root (DESIGN.md §13, issue #31): what it counts is what the
folder's own listing counts — the same names, the same bytes, the same newest id — over a
root that holds everything a listing ignores, and it never reads a sidecar, never follows
a symlink, never opens what it stats, and hands its folders over in bounded batches."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import cast

import pytest

import storage_backends
from gateway.directory import create_directory
from gateway.fleet import FleetIndex
from gateway.fleet.index import FolderStats
from storage_backends import (
    BackupLocation,
    BackupStore,
    FolderMark,
    FolderSummary,
    FolderUnchanged,
    SystemFolder,
)
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
from .support import LocalHarness, S3Harness, eventually, make_config, s3_settings, wait_until

SIDECAR = b'{"filename":"b.tar.gz","sha256":"","mimetype":"application/gzip"}'


def backup_id(ms: int, suffix: str = ".tar.gz") -> str:
    return new_uuid7(ms) + suffix


def put(folder: Path, name: str, size: int, sidecar: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(b"x" * size)
    if sidecar:
        (folder / (name + SIDECAR_SUFFIX)).write_bytes(SIDECAR)


def summaries(batches: Iterable[Sequence[object]]) -> list[FolderSummary]:
    """Every item of a walk without marks: each one a summary, read."""
    found = [item for batch in batches for item in batch]
    assert all(isinstance(item, FolderSummary) for item in found)
    return cast(list[FolderSummary], found)


def walked(root: Path) -> list[tuple[SystemFolder, int, int, str]]:
    return [
        (s.folder, s.count, s.total_bytes, s.newest_id) for s in summaries(local_scan.walk(root))
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
    batches = list(local_scan.walk(root))
    assert [(s.folder, s.count, s.total_bytes, s.newest_id) for s in summaries(batches)] == (
        everything
    )
    for batch in batches[:-1]:
        # a batch ends at the first folder that reaches either bound
        assert len(batch) <= 2
        assert sum(s.count for s in summaries([batch[:-1]])) < 5


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


def wait_until_marks_can_hold(*folders: Path) -> None:
    """Until the clock is past every folder's ctime by the walk's racy window: before it, a
    walk gives those folders no mark (observed: the clock against the folders' own ctime)."""
    newest = max(folder.stat().st_ctime for folder in folders)
    wait_until(lambda: time.time() > newest + local_scan.RACY_SECONDS, "marks old enough")


def test_a_rescan_reads_only_the_folders_whose_mark_moved(root: Path) -> None:
    ms = 1_700_000_000_000
    keys = ["KEY-A", "KEY-B", "KEY-C", "KEY-D", "KEY-E"]
    names = {
        key: [backup_id(ms + 10 * i), backup_id(ms + 10 * i + 1)] for i, key in enumerate(keys)
    }
    org = root / "org_a"
    for key, pair in names.items():
        for name in pair:
            put(org / key, name, 10)
    # just written: a mark this recent cannot prove that nothing changed after the read
    assert all(s.mark is None for s in summaries(local_scan.walk(root)))
    wait_until_marks_can_hold(*(org / key for key in keys))
    first = {s.folder.system_key: s for s in summaries(local_scan.walk(root))}
    assert {key: s.mark for key, s in first.items()} == {
        key: FolderMark((org / key).stat().st_ino, (org / key).stat().st_ctime_ns) for key in keys
    }

    added, rewritten, new = backup_id(ms + 100), backup_id(ms + 200), backup_id(ms + 300)
    put(org / "KEY-B", added, 5)  # a backup added
    os.unlink(org / "KEY-C" / names["KEY-C"][1])  # the newest removed
    stamp = (org / "KEY-D").stat()
    put(org / "KEY-D", rewritten, 5)
    os.utime(org / "KEY-D", ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # mtime set back
    (org / "KEY-E").rename(root / "elsewhere")
    (org / "KEY-E").symlink_to(root / "elsewhere")  # a folder replaced by a symlink
    put(org / "KEY-F", new, 7)  # a new folder: no mark known

    items = [
        item
        for batch in local_scan.walk(root, lambda o, k: first[k].mark if k in first else None)
        for item in batch
    ]
    by_key = {item.folder.system_key: item for item in items}
    assert by_key.pop("KEY-A") == FolderUnchanged(SystemFolder("org_a", "KEY-A"))
    read = summaries([list(by_key.values())])  # every other folder read again
    assert {s.folder.system_key: (s.count, s.total_bytes, s.newest_id) for s in read} == {
        "KEY-B": (3, 25, added),
        "KEY-C": (1, 10, names["KEY-C"][0]),
        "KEY-D": (3, 25, rewritten),
        "KEY-F": (1, 7, new),
    }
    # changed just now: read again by the next scan, whatever it finds
    assert all(s.mark is None for s in read)
    # what the rescan tells, with the unchanged folder's earlier summary, is a full walk's
    first_a = first["KEY-A"]
    assert [
        (first_a.folder, first_a.count, first_a.total_bytes, first_a.newest_id)
        if isinstance(item, FolderUnchanged)
        else (item.folder, item.count, item.total_bytes, item.newest_id)
        for item in items
    ] == walked(root)


def test_a_folder_that_moved_with_its_organization_is_not_taken_for_the_old_one(
    root: Path,
) -> None:
    """Moving an organization's folder leaves its system folders' inodes and ctimes as they
    were: the old name, made a symlink to the moved folder, carries the old mark through
    the link, and is still no folder (never yielded, never "unchanged")."""
    name = backup_id(1_700_000_000_000)
    put(root / "org_a" / "KEY-1", name, 10)
    wait_until_marks_can_hold(root / "org_a" / "KEY-1")
    (first,) = summaries(local_scan.walk(root))
    assert first.mark is not None

    (root / "org_a").rename(root / "org_z")
    (root / "org_a").mkdir()
    (root / "org_a" / "KEY-1").symlink_to(root / "org_z" / "KEY-1")
    moved = (root / "org_a" / "KEY-1").stat()  # through the link: the mark it had
    assert FolderMark(moved.st_ino, moved.st_ctime_ns) == first.mark

    items = [item for batch in local_scan.walk(root, lambda o, k: first.mark) for item in batch]
    # org_z/KEY-1 carries the mark too (the same folder): unchanged, under its new name
    assert items == [FolderUnchanged(SystemFolder("org_z", "KEY-1"))]


async def test_a_change_of_its_own_makes_the_next_scan_read_the_folder(
    tmp_path: Path, directory_file: Path
) -> None:
    """The index told of a delete that storage does not show (it did not land): with no
    re-read due, the index counts one backup less until the folder is read again — which
    the next scan does, though the folder's mark never moved."""
    harness = LocalHarness(tmp_path / "backups")
    ms = int(time.time() * 1000) - 86_400_000
    older = BackupLocation("org_c1", "KEY-0", backup_id(ms))
    newer = BackupLocation("org_c1", "KEY-0", backup_id(ms + 1))
    harness.put(older, b"12345")
    harness.put(newer, b"123")
    wait_until_marks_can_hold(harness.root / "org_c1" / "KEY-0")
    async with started_index(tmp_path, harness, full_read_seconds=math.inf) as (_, index):
        assert await index.scan()
        assert index.stats("org_c1", "KEY-0") == FolderStats(2, 8, ms + 1)
        index.removed(FOLDER, older.backup_id, 5, index.ticket())
        assert index.stats("org_c1", "KEY-0") == FolderStats(1, 3, ms + 1)
        assert index.folder_rereads == 0
        assert await index.scan()
        assert index.stats("org_c1", "KEY-0") == FolderStats(2, 8, ms + 1)
        assert harness.exists(older) and harness.exists(newer)


FOLDER = SystemFolder("org_c1", "KEY-0")


@contextlib.asynccontextmanager
async def started_index(
    tmp_path: Path,
    harness: LocalHarness,
    full_read_seconds: float,
    reread_delay_seconds: float = 0,
) -> AsyncIterator[tuple[BackupStore, FleetIndex]]:
    """A started local store (io inline) over the harness's root, and an index of it."""
    config = make_config(tmp_path, harness.storage(io="inline"))
    store = storage_backends.create_store(config.storage)
    await store.start()
    try:
        directory = create_directory(config.directory)
        yield (
            store,
            FleetIndex(
                config.fleet,
                store,
                directory,
                full_read_seconds=full_read_seconds,
                reread_delay_seconds=reread_delay_seconds,
            ),
        )
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def folder_of_five_byte_backups(
    tmp_path: Path, count: int, reread_delay_seconds: float
) -> AsyncIterator[tuple[LocalHarness, BackupStore, FleetIndex, list[BackupLocation], int]]:
    """`count` backups of 5 bytes in FOLDER, one millisecond apart from `ms` a day ago, and
    an index of them (every scan a full read) on a started local store."""
    harness = LocalHarness(tmp_path / "backups")
    ms = int(time.time() * 1000) - 86_400_000
    places = [BackupLocation("org_c1", "KEY-0", backup_id(ms + i)) for i in range(count)]
    for place in places:
        harness.put(place, b"12345")
    async with started_index(tmp_path, harness, 0, reread_delay_seconds) as (store, index):
        assert await index.scan()
        assert index.stats("org_c1", "KEY-0") == FolderStats(count, 5 * count, ms + count - 1)
        yield harness, store, index, places, ms


async def test_a_delete_a_scan_was_swapped_in_across_is_settled_by_a_listing(
    tmp_path: Path, directory_file: Path
) -> None:
    """A delete that began before a scan and is told after it: what the scan read may or
    may not show it gone, so the folder is listed again; a delete that began after is
    applied as it is, with no listing (the steady stream of deletes costs none each)."""
    async with folder_of_five_byte_backups(tmp_path, 6, 0) as (harness, store, index, places, ms):
        # after the scan: applied as told, no listing
        ticket = index.ticket()
        await store.delete(places[0])
        index.removed(FOLDER, places[0].backup_id, 5, ticket)
        assert index.stats("org_c1", "KEY-0") == FolderStats(5, 25, ms + 5)
        assert index.folder_rereads == 0

        # begun before a scan that already saw it gone: counted once, not twice
        ticket = index.ticket()
        await store.delete(places[1])
        assert await index.scan()
        index.removed(FOLDER, places[1].backup_id, 5, ticket)
        await eventually(lambda: index.folder_rereads == 1, "the folder listed again")
        assert index.stats("org_c1", "KEY-0") == FolderStats(4, 20, ms + 5)

        # begun before a re-read of its folder (another delete's, of the newest) landed:
        # applied as told, though the listing showed it gone already; no listing again
        # (under a steady stream of deletes that would list the folder for ever), and the
        # next scan reads the folder, whose mark the change dropped
        ticket = index.ticket()
        await store.delete(places[2])
        newest_ticket = index.ticket()
        await store.delete(places[5])
        index.removed(FOLDER, places[5].backup_id, 5, newest_ticket)
        await eventually(lambda: index.folder_rereads == 2, "the newest's folder listed")
        assert index.stats("org_c1", "KEY-0") == FolderStats(2, 10, ms + 4)
        index.removed(FOLDER, places[2].backup_id, 5, ticket)
        assert index.stats("org_c1", "KEY-0") == FolderStats(1, 5, ms + 4)
        assert await index.scan()
        assert index.stats("org_c1", "KEY-0") == FolderStats(2, 10, ms + 4)
        assert index.folder_rereads == 2
        assert [harness.exists(p) for p in places] == [False] * 3 + [True] * 2 + [False]


async def test_a_burst_of_deletes_of_the_newest_costs_one_listing(
    tmp_path: Path, directory_file: Path
) -> None:
    """A newest-first cleanup: each delete takes the newest, which only a listing can
    replace. Count and bytes follow each delete at once; the newest's time follows one
    listing after the burst, not one listing a delete."""
    async with folder_of_five_byte_backups(tmp_path, 8, 0.5) as (_, store, index, places, ms):
        for done, place in enumerate(reversed(places[2:]), start=1):
            ticket = index.ticket()
            await store.delete(place)
            index.removed(FOLDER, place.backup_id, 5, ticket)
            stats = index.stats("org_c1", "KEY-0")
            assert stats is not None and (stats.backups, stats.bytes) == (8 - done, 5 * (8 - done))
        await eventually(
            lambda: index.stats("org_c1", "KEY-0") == FolderStats(2, 10, ms + 1),
            "the newest's time after the burst",
        )
        assert index.folder_rereads == 1


async def test_the_index_reads_changed_folders_and_every_folder_at_its_full_read(
    tmp_path: Path, directory_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    harness = LocalHarness(tmp_path / "backups")
    ms = int(time.time() * 1000) - 86_400_000
    places = [BackupLocation("org_c1", f"KEY-{i}", backup_id(ms + i)) for i in range(6)]
    for place in places:
        harness.put(place, b"12345")
    wait_until_marks_can_hold(*(harness.root / "org_c1" / p.system_key for p in places))
    config = make_config(tmp_path, harness.storage(io="inline"))
    directory = create_directory(config.directory)
    store = storage_backends.create_store(config.storage)
    await store.start()
    try:
        marks_only = FleetIndex(config.fleet, store, directory, full_read_seconds=math.inf)
        every_scan_full = FleetIndex(config.fleet, store, directory, full_read_seconds=0)
        # a day's full read spread over two scans: each reads one of two slices in full
        two_slices = config.fleet.scan_seconds * 2
        in_two_scans = FleetIndex(config.fleet, store, directory, full_read_seconds=two_slices)
        indexes = (marks_only, every_scan_full, in_two_scans)

        async def scan(fleet: FleetIndex) -> dict[str, object]:
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="gateway.fleet.index"):
                assert await fleet.scan()
            (done,) = [r for r in caplog.records if r.getMessage() == "fleet scan done"]
            return cast(dict[str, object], done.fields)  # type: ignore[attr-defined]

        for fleet in indexes:
            assert (await scan(fleet))["unchanged"] == 0  # the first scan reads everything
        # another process: a backup added, the only backup of a folder removed, and a
        # backup rewritten in place (which the store never does: its folder's mark stays)
        added = BackupLocation("org_c1", "KEY-1", backup_id(ms + 100))
        harness.put(added, b"123")
        removed = harness.root / places[2].relative_key
        os.unlink(removed)
        os.unlink(f"{removed}{SIDECAR_SUFFIX}")
        for place in places[3:5]:
            with (harness.root / place.relative_key).open("ab") as grown:
                grown.write(b"678")

        fields = await scan(marks_only)
        assert (fields["folders"], fields["unchanged"]) == (5, 4)  # KEY-0, KEY-3, KEY-4, KEY-5
        fields = await scan(every_scan_full)
        assert (fields["folders"], fields["unchanged"]) == (5, 0)
        # crc32 puts org_c1/KEY-0, KEY-1 and KEY-3 in slice 0, KEY-4 and KEY-5 in slice 1:
        # the first rescan reads slice 0 in full, the second slice 1 (and KEY-1 again while
        # its change is too recent for a mark)
        assert (await scan(in_two_scans))["unchanged"] == 2
        assert in_two_scans.stats("org_c1", "KEY-3") == FolderStats(1, 8, ms + 3)
        assert in_two_scans.stats("org_c1", "KEY-4") == FolderStats(1, 5, ms + 4)
        assert (await scan(in_two_scans))["unchanged"] in (2, 3)
        assert in_two_scans.stats("org_c1", "KEY-4") == FolderStats(1, 8, ms + 4)
        for fleet in indexes:
            assert fleet.stats("org_c1", "KEY-1") == FolderStats(2, 8, ms + 100)
            assert fleet.stats("org_c1", "KEY-2") is None
        # the rewrites only a full read sees
        assert marks_only.stats("org_c1", "KEY-3") == FolderStats(1, 5, ms + 3)
        assert marks_only.stats("org_c1", "KEY-4") == FolderStats(1, 5, ms + 4)
        assert every_scan_full.stats("org_c1", "KEY-3") == FolderStats(1, 8, ms + 3)
    finally:
        await store.close()


async def test_names_no_directory_can_give_are_told_once_not_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Backups under names no organization or system can have are never scanned (their
    bytes count for nobody, and no purge reaches them): the operator is told, once for as
    long as their number stays the same."""
    harness = LocalHarness(tmp_path / "backups", io="inline")
    name = backup_id(1_700_000_000_000)
    for place in ("org_\u00fc/KEY-1", "org_a/KEY-\u00e9", "-dash/KEY-1", "org_a/" + "k" * 129):
        put(harness.root / place, name, 10)
    put(harness.root / "org_a" / "KEY-1", name, 10)
    (harness.root / ".hidden").mkdir()  # hidden: the store's own, never told
    (harness.root / "notes.txt").write_text("a stray file")  # a name a folder could have
    (harness.root / "notes~").write_text("a stray file")  # no folder: not told
    (harness.root / "lost+found").mkdir()  # a mount point's own: not told
    config = make_config(tmp_path, harness.storage())
    store = storage_backends.create_store(config.storage)
    await store.start()
    try:

        async def scanned() -> list[tuple[str, int]]:
            found = []
            async for batch in store.folder_summaries():
                found += [(s.folder.system_key, s.count) for s in summaries([batch])]
            return found

        with caplog.at_level(logging.WARNING, logger="storage_backends.local.store"):
            assert await scanned() == [("KEY-1", 1)]
            assert await scanned() == [("KEY-1", 1)]  # the same names: not told again
            put(harness.root / "org_a" / "KEY 2", name, 10)
            assert await scanned() == [("KEY-1", 1)]
    finally:
        await store.close()
    told = [r.getMessage() for r in caplog.records if "names under the root" in r.getMessage()]
    assert [line.split(" names")[0] for line in told] == ["4", "5"]
    assert "('-dash', 'org_a/KEY-\\xe9', 'org_a/kkk" in told[0] and "'org_\\xfc')" in told[0]
    assert "'org_a/KEY 2'" in told[1]


def scan_children() -> list[int]:
    """This process's scan processes still running (by their command line)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as stat_file:
                parent = int(stat_file.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                command = cmdline.read()
        except OSError:
            continue
        if parent == os.getpid() and b"storage_backends.local.scan_process" in command:
            found.append(int(pid))
    return found


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one core: the walk stays in one")
async def test_a_large_roots_full_walk_shared_among_processes_counts_what_one_walk_does(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Past SHARED_WALK_FOLDERS system folders, a full walk is read by one process a core,
    each its share: together exactly the folders, counts, bytes, newest ids and marks of one
    walk, every folder once, odd names told once; and no process is left behind. A rescan
    (with marks) stays in the gateway's own thread."""
    from storage_backends.local.store import SHARED_WALK_FOLDERS

    harness = LocalHarness(tmp_path / "backups", io="inline")
    base = 1_700_000_000_000
    folders = SHARED_WALK_FOLDERS + 150
    for n in range(folders):
        folder = harness.root / f"org_{n % 37:02d}" / f"KEY-{n:05d}"
        for b in range(1 + n % 3):
            put(folder, backup_id(base + n * 10 + b), 10 + n + b)
    put(harness.root / "org_\u00fc" / "KEY-1", backup_id(base), 10)  # odd: told, not counted
    wait_until_marks_can_hold(*(p for p in harness.root.glob("org_[0-9]*/KEY-*")))
    one_walk = sorted(
        (s.folder.organization_id, s.folder.system_key, s.count, s.total_bytes, s.newest_id, s.mark)
        for s in summaries(local_scan.walk(harness.root))
    )
    assert len(one_walk) == folders
    assert sum(s[5] is not None for s in one_walk) == folders  # every mark old enough
    config = make_config(tmp_path, harness.storage())
    store = storage_backends.create_store(config.storage)
    await store.start()
    try:
        shared = []
        with caplog.at_level(logging.INFO, logger="storage_backends.local.store"):
            async for batch in store.folder_summaries():
                shared += [
                    (f.organization_id, f.system_key, s.count, s.total_bytes, s.newest_id, s.mark)
                    for s in batch
                    if isinstance(s, FolderSummary) and (f := s.folder)
                ]
        assert sorted(shared) == one_walk  # every folder once, nothing else
        assert scan_children() == []
        lines = [r.getMessage() for r in caplog.records]
        processes = min(len(os.sched_getaffinity(0)), 4)
        assert f"a full walk of the root shared among {processes} processes" in lines
        told = [line for line in lines if "names under the root" in line]
        assert [line.split(" names")[0] for line in told] == ["1"]

        marks = {(s[0], s[1]): s[5] for s in one_walk}
        items = [
            item
            async for batch in store.folder_summaries(lambda org, key: marks.get((org, key)))
            for item in batch
        ]
        assert scan_children() == []
        assert len(items) == folders and all(isinstance(i, FolderUnchanged) for i in items)
    finally:
        await store.close()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one core: the walk stays in one")
async def test_a_scan_process_that_dies_makes_the_thread_walk_the_root_and_leaves_no_process(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A process of a shared walk killed part-way: the other is ended with it, and the walk
    goes on in the gateway's thread from the start, so the caller still gets every folder
    (one given twice replaces the first, as the index keeps it), never a partial count
    taken for the root's."""
    from storage_backends.local.store import SHARED_WALK_FOLDERS

    harness = LocalHarness(tmp_path / "backups", io="inline")
    folders = SHARED_WALK_FOLDERS + 150
    for n in range(folders):
        put(harness.root / f"org_{n % 37:02d}" / f"KEY-{n:05d}", backup_id(1_700_000_000_000), n)
    config = make_config(tmp_path, harness.storage())
    store = storage_backends.create_store(config.storage)
    await store.start()
    try:

        async def walk() -> dict[SystemFolder, tuple[int, int]]:
            found = {}
            async for batch in store.folder_summaries():
                found.update({s.folder: (s.count, s.total_bytes) for s in summaries([batch])})
            return found

        with caplog.at_level(logging.WARNING, logger="storage_backends.local.store"):
            walking = asyncio.ensure_future(walk())

            # both appear before either can have read its share (an interpreter's start
            # alone takes longer than this wait's poll): stopped at once, one killed
            def both() -> list[int] | None:
                found = scan_children()
                return found if len(found) == 2 else None

            children = await eventually(both, "both scan processes") or []
            for pid in children:
                os.kill(pid, signal.SIGSTOP)
            os.kill(children[0], signal.SIGKILL)
            os.kill(children[1], signal.SIGCONT)
            found = await walking
        assert found == {
            SystemFolder(f"org_{n % 37:02d}", f"KEY-{n:05d}"): (1, n) for n in range(folders)
        }
        assert scan_children() == []
        warned = [r.getMessage() for r in caplog.records if "shared walk failed" in r.getMessage()]
        assert len(warned) == 1 and "ended before its walk (status -9)" in warned[0], warned
    finally:
        await store.close()


def blocked_writing(pid: int) -> bool:
    """The process sleeps in a write to a full pipe (its kernel wait channel says so)."""
    try:
        with open(f"/proc/{pid}/wchan") as wchan:
            return "pipe_write" in wchan.read()
    except OSError:
        return False


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one core: the walk stays in one")
async def test_a_dead_scan_process_behind_a_lagging_consumer_still_ends_the_walk(
    tmp_path: Path,
) -> None:
    """The consumer lags (a busy event loop): the frames queue is full, the readers wait on
    it, the pipes are paused and both processes sleep writing to them. One dies: the other is
    killed and reaped — its paused pipe read to its end, or reaping it would wait for ever —
    and the walk ends in the thread with every folder."""
    harness = LocalHarness(tmp_path / "backups", io="inline")
    folders = 20_000  # long names: big frames, more than the queue and pipes hold
    for n in range(folders):
        folder = harness.root / f"org_{n % 7}" / (f"KEY-{n:05d}" + "x" * 100)
        put(folder, backup_id(n), 1, sidecar=False)
    config = make_config(tmp_path, harness.storage())
    store = storage_backends.create_store(config.storage)
    await store.start()
    try:
        batches = aiter(store.folder_summaries())
        found = {s.folder for s in summaries([await anext(batches)])}
        children = scan_children()
        assert len(children) == 2
        await eventually(lambda: all(map(blocked_writing, children)), "both blocked on a pipe")
        os.kill(children[0], signal.SIGKILL)

        def lagging() -> bool:  # until every pipe is full again, or its writer gone
            return all(
                blocked_writing(pid) or not os.path.exists(f"/proc/{pid}") for pid in children
            )

        async def the_rest() -> None:
            async for batch in batches:
                found.update(s.folder for s in summaries([batch]))
                await eventually(lagging, "the pipes full again")

        await asyncio.wait_for(the_rest(), 60)
        assert len(found) == folders
        assert scan_children() == []
    finally:
        await store.close()
