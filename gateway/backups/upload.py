"""POST /api/systems/backups: an appliance uploads a backup (DESIGN.md §9, §11).

Order: the appliance's credentials (401) → no Content-Encoding (415) → a Content-Length
(411) → not empty (400) → the per-upload and per-system byte caps (413) → the backups
kept with it within the system's cap (413) → the system's upload rate (429) → the
organization's quota (413) → its size reserved → `100 Continue`, when asked for → the
body, streamed into the store with its sha256 → under the system's lock, not a retry of a
backup stored moments ago (200), the rules applied again and the commit → 201 →
retention, in the background. Every refusal closes the connection after its answer: an
unread body is never drained, and a client that waited for `100 Continue` never sends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from storage_backends import (
    DEFAULT_MIMETYPE,
    BackupInfo,
    NewBackup,
    StagedBackup,
    StorageError,
    StorageNotConfigured,
    SystemFolder,
    UploadIncomplete,
)
from storage_backends.ids import backup_unix_ms, new_uuid7, upload_extension

from ..config import CONFIG, Config
from ..directory import System
from ..http.aiohttp_internals import requests_queued_behind, send_continue
from ..http.connections import DESCRIPTORS
from ..http.envelope import envelope
from ..http.errors import ApiError, storage_error
from ..http.middlewares import REQUEST_ID
from ..identity.appliance import basic_credentials
from .appliance_login import appliance
from .audit import record_upload
from .digests import InvalidDigest, requested_sha256
from .limits.reservations import Claim, Refused, Reservations, Reserved, Room, WaitingRoom
from .listing import item
from .names import sanitized
from .rates import UploadRates
from .retention import RETENTION, Cause
from .storage import STORE, run_storage
from .storage_changes import backup_stored
from .system_lock import SYSTEM_LOCKS, LockBusy
from .upload_room import ORGANIZATION_FULL, SYSTEM_FULL, kept_bytes, room_with
from .usage import USAGE_COUNTER

log = logging.getLogger(__name__)

UPLOAD_RATES = web.AppKey("upload_rates", UploadRates)
RESERVATIONS = web.AppKey("reservations", Reservations)
UPLOAD_CLAIM = web.RequestKey("upload_claim", Claim)  # the room this upload holds
# beyond the store's operation time, for a landing upload's lock exit and release
SETTLE_MARGIN_SECONDS = 2.0

# how long an upload's commit waits for its system's lock (a pruning slice holds it ~2 s)
COMMIT_LOCK_WAIT_SECONDS = 3.0

MAX_FILENAME = 255
DUPLICATE = "backup already stored"
_MIMETYPE = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}", re.ASCII
)
_CONTENT_LENGTH = re.compile(r"[0-9]{1,19}", re.ASCII)
_PATH_SEPARATORS = re.compile(r"[/\\]")
_DISCARDING: set[asyncio.Task[None]] = set()


class _RequestBody:
    """The request's body as the store reads it (storage_backends.UploadBody)."""

    def __init__(self, request: web.Request, size: int) -> None:
        self._content = request.content
        self._left = size

    async def read(self, limit: int) -> bytes:
        try:
            data = await self._content.read(min(limit, self._left))
        except (HttpProcessingError, ConnectionError, OSError) as exc:
            raise UploadIncomplete(f"body cut short: {type(exc).__name__}") from None
        if not data:
            raise UploadIncomplete(f"body ended {self._left} bytes early")
        self._left -= len(data)
        return data


async def upload_backup(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG]
    credentials = basic_credentials(request)
    system: System | None = None
    try:
        async with contextlib.AsyncExitStack() as reserved:  # the room it was given, until it ends
            async with asyncio.timeout(config.server.request_timeout_seconds):
                system = await appliance(request)
                expected = _requested_digest(request)
                backup = _new_backup(request, system, _checked_size(request), expected)
                await _admit(request, system, backup, reserved)
            await _continue(request)
            stored, new, pruning = await _store(request, system, backup)
    except TimeoutError:
        error = ApiError(504, "request timed out")
    except ApiError as exc:
        error = exc
    except asyncio.CancelledError:
        # the client went away (servers with handler cancellation) or shutdown cut it short
        if credentials is not None:
            record_upload(
                request, credentials.system_key, system.id if system else None, "cancelled"
            )
        raise
    else:
        data = item(stored)
        if not new:  # a retry of one stored moments ago: nothing stored, nothing pruned
            record_upload(request, system.system_key or "", system.id, DUPLICATE, data)
            return envelope(200, DUPLICATE, data)
        _stored_bookkeeping(request.app, system, request[REQUEST_ID], stored, prune=not pruning)
        record_upload(request, system.system_key or "", system.id, "backup stored", data)
        return envelope(201, "backup stored", data)
    if credentials is not None:
        record_upload(request, credentials.system_key, system.id if system else None, error.message)
    response = envelope(error.status, error.message, error.data, error.headers)
    response.force_close()  # whatever of the body is unread stays unread
    return response


def _hold_descriptors(request: web.Request, held: contextlib.AsyncExitStack) -> None:
    """Count the descriptors the store's upload holds (a local one: the folder and the
    hidden file) beside the connections', until the upload ends; 503 with Retry-After,
    before the body, when every descriptor the process has is a request's. Without it a
    fleet uploading at once took more descriptors than the process had, and every
    request failed. They are given back when the request ends: an upload discarded in the
    background after it (a client gone, a hung disk) holds its two a moment longer,
    within the reserve."""
    budget = request.app.get(DESCRIPTORS)
    wanted = request.app[STORE].capabilities.upload_descriptors
    if budget is None or not wanted:
        return
    if not budget.take_descriptors(wanted):
        raise ApiError(503, "too many uploads in progress, retry later", None, {"Retry-After": "5"})
    held.callback(budget.give_descriptors, wanted)


async def _continue(request: web.Request) -> None:
    expect = request.headers.get("Expect")
    if expect is None:
        return
    if expect.strip().lower() != "100-continue":
        raise ApiError(417, "expectation failed")
    if request.version >= (1, 1):
        await send_continue(request)


def _checked_size(request: web.Request) -> int:
    retention = request.app[CONFIG].storage.retention
    if request.headers.get("Content-Encoding", "identity").strip().lower() != "identity":
        raise ApiError(415, "Content-Encoding is not accepted")
    lengths = request.headers.getall("Content-Length", [])
    if len(lengths) != 1 or not _CONTENT_LENGTH.fullmatch(lengths[0].strip()):
        raise ApiError(411, "Content-Length required")
    size = int(lengths[0])
    if size == 0:
        raise ApiError(400, "empty upload")  # not a backup: it would push a real one out
    for cap in (retention.max_upload_bytes, retention.max_bytes_per_system):
        if cap and size > cap:
            raise ApiError(413, "backup too large")
    return size


async def _admit(
    request: web.Request, system: System, backup: NewBackup, reserved: contextlib.AsyncExitStack
) -> None:
    """The room checks and the rate; on passing, the upload's size is reserved (across
    processes: see `limits.reservations` for how a reservation and the bytes read from
    storage never both miss an upload)."""
    app = request.app
    config = app[CONFIG]
    retention = config.storage.retention
    store = app[STORE]
    if not store.capabilities.stores_uploads:
        raise storage_error(StorageNotConfigured(store.name), "store backup")
    folder = SystemFolder(backup.location.organization_id, backup.location.system_key)
    reservations = app[RESERVATIONS]
    policy = app[RETENTION].policy
    cap = retention.max_bytes_per_system
    limit = retention.max_bytes_per_organization

    async def kept_now() -> int:
        return await run_storage(
            request,
            "list",
            lambda f: kept_bytes(store, f, backup.location.backup_id, backup.size, policy),
            folder,
            "store backup",
        )

    async def used_now() -> int:
        return await run_storage(
            request, "usage", store.organization_usage, system.organization_id, "store backup"
        )

    # a landing upload releases within its commit's time, its lock's exit and the release
    waits = reservations.waiting_room(
        folder.system_key,
        system.organization_id,
        config.storage.operation_timeout_seconds + SETTLE_MARGIN_SECONDS,
    )
    while True:
        seen = await waits.look()  # before reads
        kept = await kept_now() if cap else 0
        if not cap or kept + seen.system_bytes <= cap:
            break
        # double counted, perhaps: an upload may have landed since `seen` was looked at
        # (and be landing now, or released); without room in what is stored, no wait helps
        now = await waits.look()
        released = now.releases != seen.releases
        settling = _may_fit(kept, seen.system_bytes, now.system_landing, cap, released)
        if not await waits.worth_another_check(settling, seen.releases):
            raise ApiError(413, SYSTEM_FULL)
    # before the rate: a 503 is the server's doing, and must not cost the appliance a slot
    _hold_descriptors(request, reserved)
    wait = await app[UPLOAD_RATES].admit(folder.system_key)
    if wait is not None:
        raise ApiError(429, "too many uploads", None, {"Retry-After": str(wait)})
    while True:
        used = await used_now() if limit else 0
        claim = Claim(
            uuid.uuid4().hex,
            folder.system_key,
            system.organization_id,
            backup.size,
            _deadline_seconds(config, backup.size),
        )
        async with contextlib.AsyncExitStack() as held:
            answer = await reservations.hold(claim, Room(cap, kept, limit, used), seen, held)
            if isinstance(answer, Reserved):
                refused = await _read_again(answer, waits, kept_now, used_now, cap, limit, backup)
                if refused is None:
                    reserved.push_async_exit(held.pop_all())  # held until the upload ends
                    request[UPLOAD_CLAIM] = claim
                    return
            else:
                refused = answer
            # waited for with this one's room still held: its own release is not the one
            again = await waits.worth_another_check(refused.settling, refused.releases)
        if not again:
            raise ApiError(413, SYSTEM_FULL if refused.full == "system" else ORGANIZATION_FULL)
        seen = await waits.look()
        kept = await kept_now() if cap else 0


async def _read_again(
    answer: Reserved,
    waits: WaitingRoom,
    kept_now: Callable[[], Awaitable[int]],
    used_now: Callable[[], Awaitable[int]],
    cap: int,
    limit: int,
    backup: NewBackup,
) -> Refused | None:
    """Released since `seen`: that upload's bytes may be in neither what was read nor the
    reservations; read again, now that this one is held, against the others' reservations
    as they were when it was. An upload that landed since may be in both: `settling` when
    one is landing, or released since."""
    if answer.system_stale and cap:
        kept = await kept_now()
        if kept + answer.others_system > cap:
            now = await waits.look()
            released = now.releases != answer.releases
            settling = _may_fit(kept, answer.others_system, now.system_landing, cap, released)
            return Refused("system", settling, answer.releases)
    if answer.organization_stale and limit:
        used = await used_now() + backup.size
        if used + answer.others_organization > limit:
            now = await waits.look()
            released = now.releases != answer.releases
            others, landing = answer.others_organization, now.organization_landing
            settling = _may_fit(used, others, landing, limit, released)
            return Refused("organization", settling, answer.releases)
    return None


def _may_fit(stored: int, reserved: int, landing: int, cap: int, released: bool) -> bool:
    """Whether a check that failed (`stored` + `reserved` over `cap`) may pass when made
    again: it fits without the bytes landing now (counted twice, perhaps), or an upload
    released since it looked and what is stored alone leaves room."""
    return stored + reserved - landing <= cap or (released and stored <= cap)


def _deadline_seconds(config: Config, size: int) -> float:
    """The longest an upload can last: its checks, its body at the slowest rate accepted,
    the wait for its system's lock and its commit. Its reservation expires then."""
    seconds = config.server.request_timeout_seconds
    body = seconds + size / config.storage.retention.min_rate_bytes_per_second
    return seconds + body + COMMIT_LOCK_WAIT_SECONDS + config.storage.operation_timeout_seconds


def _requested_digest(request: web.Request) -> str | None:
    """The body's sha256 as the appliance gives it (DESIGN.md §12), checked right after
    the credentials and before anything is read: 400 invalid / required digest."""
    try:
        expected = requested_sha256(request.headers)
    except InvalidDigest as exc:
        log.info("upload refused: %s", exc)
        raise ApiError(400, "invalid digest") from None
    if expected is None and request.app[CONFIG].storage.retention.require_digest:
        raise ApiError(400, "digest required")
    return expected


def _new_backup(
    request: web.Request, system: System, size: int, expected_sha256: str | None
) -> NewBackup:
    assert system.system_key is not None
    now = datetime.now(UTC)
    last_part = _PATH_SEPARATORS.split(request.headers.get("X-Filename", ""))[-1]
    uuid = new_uuid7(int(now.timestamp() * 1000))
    backup_id = uuid + upload_extension(last_part)
    given = "Content-Type" in request.headers and _MIMETYPE.fullmatch(request.content_type)
    return NewBackup(
        location=SystemFolder(system.organization_id, system.system_key).location(backup_id),
        size=size,
        filename=sanitized(last_part)[:MAX_FILENAME] or f"backup-{uuid}",
        mimetype=request.content_type if given else DEFAULT_MIMETYPE,
        # the client: the peer, or what a trusted proxy forwarded (http.client_address)
        uploader_ip=request.remote or "",
        uploaded_at=now,
        expected_sha256=expected_sha256,
    )


async def _store(
    request: web.Request, system: System, backup: NewBackup
) -> tuple[BackupInfo, bool, bool]:
    """The backup stored (True), or the one this upload repeats (False); and whether its
    pruning run has begun (on the lock of its commit)."""
    config = request.app[CONFIG]
    store = request.app[STORE]
    seconds = (
        config.server.request_timeout_seconds
        + backup.size / config.storage.retention.min_rate_bytes_per_second
    )
    staged: StagedBackup | None = None
    handed_over = False  # to a commit: from then on the commit decides what is left
    try:
        async with asyncio.timeout(seconds):
            stage = functools.partial(store.stage_upload, backup)
            body = _RequestBody(request, backup.size)
            staged = await run_storage(request, "upload", stage, body, "store backup")
            # RFC 9112 §9.3.2: clients do not pipeline after a POST, so whatever follows an
            # upload on its connection is taken as the rest of a body longer than announced.
            if requests_queued_behind(request):
                raise storage_error(UploadIncomplete("more bytes than announced"), "store backup")
    except TimeoutError:
        _discard_later(staged)
        raise ApiError(408, "upload timed out") from None
    except BaseException:
        _discard_later(staged)
        raise
    try:
        expected = backup.expected_sha256
        if expected is not None and not hmac.compare_digest(staged.info.sha256, expected):
            raise ApiError(400, "checksum mismatch")
        pruning = await _commit_if_room(request, system, staged, backup)
        handed_over = True
    except _Repeats as repeated:
        await _discard_now(request, staged)
        handed_over = True
        return repeated.earlier, False, False
    except _OutcomeUnknown:
        handed_over = True
        raise
    except ApiError:
        # refused after its body: what it left goes before the answer says "nothing stored"
        await _discard_now(request, staged)
        handed_over = True
        raise
    finally:
        if not handed_over:
            _discard_later(staged)
    return staged.info, True, pruning


async def _discard_now(request: web.Request, staged: StagedBackup) -> None:
    """Discard within the store's operation time (a store may hold it in place already);
    past that, in the background."""
    task = asyncio.ensure_future(staged.discard())
    try:
        await asyncio.wait_for(
            asyncio.shield(task), request.app[CONFIG].storage.operation_timeout_seconds
        )
    except TimeoutError:
        _DISCARDING.add(task)
        task.add_done_callback(_DISCARDING.discard)


async def _stored_moments_ago(request: web.Request, backup: NewBackup) -> BackupInfo | None:
    """A backup of the system with the same sha256 stored within the duplicate window: an
    appliance that lost the answer and sent again (DESIGN.md §12)."""
    window = request.app[CONFIG].storage.retention.duplicate_window_seconds
    if not window:
        return None
    store = request.app[STORE]
    location = backup.location
    folder = SystemFolder(location.organization_id, location.system_key)
    since = backup_unix_ms(location.backup_id) - int(window * 1000)
    entries = await run_storage(request, "list", store.list_entries, folder, "store backup")
    recent = sorted(
        (
            e.id
            for e in entries
            # not this upload's own: staged, it is never listed before its commit (StagedBackup)
            if e.id != location.backup_id
            and backup_unix_ms(e.id) >= since
            and e.size == backup.size
        ),
        reverse=True,
    )
    for backup_id in recent:
        try:
            info = await store.describe(folder.location(backup_id))
        except StorageError:
            continue  # gone, or unreadable now: not the one to answer with
        if info.sha256 and hmac.compare_digest(info.sha256, backup.expected_sha256 or ""):
            return info
    return None


def _discard_later(staged: StagedBackup | None) -> None:
    """Never awaited here: the request may be cancelled (client gone)."""
    if staged is None:
        return
    task = asyncio.ensure_future(staged.discard())
    _DISCARDING.add(task)
    task.add_done_callback(_DISCARDING.discard)


class _Repeats(Exception):
    """The upload repeats `earlier`, a backup of its system stored moments ago."""

    def __init__(self, earlier: BackupInfo) -> None:
        super().__init__()
        self.earlier = earlier


async def _unless_repeated(request: web.Request, backup: NewBackup) -> None:
    """_Repeats when the upload is a retry of a backup stored within the window (only an
    upload with a digest can be one). Checked under the system's lock, right before the
    commit: a retry sent while the first upload was still going (an appliance that gave up
    waiting for the answer) finds the first once it landed, instead of both landing."""
    if backup.expected_sha256 is None:
        return
    earlier = await _stored_moments_ago(request, backup)
    if earlier is not None:
        raise _Repeats(earlier)


class _OutcomeUnknown(ApiError):
    def __init__(self) -> None:
        super().__init__(504, "upload outcome unknown")


async def _commit_if_room(
    request: web.Request, system: System, staged: StagedBackup, backup: NewBackup
) -> bool:
    """Under the system's lock: not a retry of a backup stored moments ago (_Repeats), the
    keep rules applied to what is stored now, then the commit; True when the lock went on
    to the pruning run, with that decision. A lock held elsewhere for longer than an upload
    should wait does not stop the upload: it is committed after the checks before its
    body, and the sweep prunes."""
    app = request.app
    cap = app[CONFIG].storage.retention.max_bytes_per_system
    info = staged.info
    folder = SystemFolder(system.organization_id, info_system_key(system))
    retention = app[RETENTION]
    try:
        async with app[SYSTEM_LOCKS].hold(folder, wait_seconds=COMMIT_LOCK_WAIT_SECONDS) as lease:
            await _unless_repeated(request, backup)
            if not cap:
                await _commit_in_time(request, system, staged)
                return False
            store, policy = app[STORE], retention.policy
            decision, kept = await run_storage(
                request,
                "list",
                lambda f: room_with(store, f, info.id, info.size, policy),
                folder,
                "store backup",
            )
            if kept > cap:
                raise ApiError(413, SYSTEM_FULL)  # a race lost: this one goes, no older
            await _commit_in_time(request, system, staged)
            if not policy.prunes:
                return False
            # the decision is what a run would see now: this commit is the one change since
            cause = Cause(request[REQUEST_ID], system.id)
            retention.prune_decided(folder, decision, lease, cause)
            return True
    except LockBusy:
        log.warning(
            "system lock of %s busy: committed after the checks before its body",
            folder.system_key,
        )
        await _unless_repeated(request, backup)
        await _commit_in_time(request, system, staged)
        return False


async def _commit_in_time(request: web.Request, system: System, staged: StagedBackup) -> None:
    """Once the commit is sent the backup may land whatever happens to this request: wait
    for its outcome at most the store's operation time, then answer 504 `upload outcome
    unknown`, with the bookkeeping done if it lands after all."""
    app = request.app
    # an upload checking its room from now on may read these bytes stored while this
    # reservation still holds them: it waits for the release rather than count them twice
    await app[RESERVATIONS].landing(request[UPLOAD_CLAIM])
    commit = asyncio.ensure_future(run_storage(request, "commit", _commit, staged, "store backup"))
    try:
        await asyncio.wait_for(
            asyncio.shield(commit), app[CONFIG].storage.operation_timeout_seconds
        )
    except TimeoutError:
        request_id = request[REQUEST_ID]

        def settled(done: asyncio.Future[None]) -> None:
            if done.cancelled() or done.exception() is not None:
                _discard_later(staged)
                return
            log.info("upload %s landed after its answer", staged.info.id)
            _stored_bookkeeping(app, system, request_id, staged.info)

        commit.add_done_callback(settled)
        raise _OutcomeUnknown() from None


async def _commit(staged: StagedBackup) -> None:
    await staged.commit()


def info_system_key(system: System) -> str:
    assert system.system_key is not None  # found by its key
    return system.system_key


def _stored_bookkeeping(
    app: web.Application, system: System, request_id: str, stored: BackupInfo, prune: bool = True
) -> None:
    """A backup landed: the usage counter dropped, the fleet's index told, retention run in
    the background (unless its commit began the run)."""
    usage = app.get(USAGE_COUNTER)
    if usage is not None:
        usage.changed(system.organization_id)
    folder = SystemFolder(system.organization_id, info_system_key(system))
    backup_stored(app, folder, stored.id, stored.size)
    if prune:
        app[RETENTION].prune_soon(folder, Cause(request_id, system.id))
