"""Uploads to S3: the body streamed to a staging key (one PUT, or parts above the
threshold) with its sha256 on the way, then copied into place with its metadata, so a
backup appears whole, checksum and all. What a failure or a crash leaves under the
staging prefix is removed, or cleared by a lifecycle rule on it.

With the appliance's digest known before the body (DESIGN.md §12) the body goes straight to
its final key with its metadata and the store's own check (`x-amz-checksum-sha256`), written
once, no staging copy — and never visible before the commit, since a backup at its final
key is listed from the moment it lands, before the gateway has decided what the upload is
(a retry answered with an earlier backup, a refusal under the system's lock):

- a small body (up to `HELD_BODY_BYTES`, while the process's held budget,
  `HELD_BYTES_PER_PROCESS`, has room for it) is read into memory and hashed; the commit is one
  PutObject (`_HeldForCommit`). A wrong body never reaches the store.
- a larger one is a multipart upload at the final key whose parts each carry their own
  checksum (each sent while the next is read) — up to the threshold one part, streamed,
  whose checksum is the digest itself —
  completed only once the gateway's sha256 of the whole body equals the digest
  (`_MultipartInPlace`)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import quote

from botocore.exceptions import ClientError

from ..base import BackupInfo, NewBackup, StagedBackup, UploadBody
from ..errors import (
    BackupNotFound,
    ChecksumRefused,
    StorageError,
    StorageUnavailable,
    UploadIncomplete,
)
from .errors import STORE_FAILURES, error_code, reason, require_ok
from .parts_in_flight import PartsInFlight
from .settings import S3Config
from .signed import Answer, SignedRequests

log = logging.getLogger(__name__)

# Uploads are staged under this prefix (never a system's folder, so never listed or counted)
# and copied into place with their metadata: a lifecycle rule on it clears what a crash left.
STAGING_PREFIX = ".uploads/"
STREAM_CHUNK_BYTES = 1024 * 1024
# a store's answer to a PUT, a part or a CopyObject may take this long per byte it persists,
# beyond the read (or operation) timeout
PERSIST_SECONDS_PER_BYTE = 1 / (20 * 1024**2)
# A body with a digest up to this size is held in memory until its commit, one PutObject:
# a multipart upload costs a 1 MB backup two more requests, and the store ~1.5x the CPU.
HELD_BODY_BYTES = 8 * 1024**2
# What a process holds at most of such bodies and of digest uploads' second parts in memory;
# beyond it a small body goes up as a multipart upload instead (one part, streamed) and a
# large one a part at a time: slow bodies never pin more memory than this budget (and a
# large upload's own part).
HELD_BYTES_PER_PROCESS = 64 * 1024**2
# The parts of one digest upload in memory at once: one going up while the next is read
# (parts_in_flight.py; the second taken from the held budget). Three measured within the
# noise of two on SeaweedFS (docs/benchmarks.md), at one more part of memory.
PARTS_IN_FLIGHT = 2

_BACKGROUND: set[asyncio.Task[None]] = set()


def _background(work: Any) -> None:
    task = asyncio.ensure_future(work)
    _BACKGROUND.add(task)  # a reference, so the task is not collected half-way
    task.add_done_callback(_BACKGROUND.discard)


class Uploads:
    """The store's upload side, on the store's own client and signed requests."""

    def __init__(
        self,
        config: S3Config,
        operation_timeout: float,
        client: Any,
        signed: SignedRequests,
        require_bucket: Callable[[], Awaitable[None]],
        delete_key: Callable[[str], Awaitable[None]],
    ) -> None:
        self._config = config
        self._timeout = operation_timeout
        self._client = client
        self._signed = signed
        self._require_bucket = require_bucket
        self._delete_key = delete_key  # BackupNotFound when absent
        self._held = HeldBytes(HELD_BYTES_PER_PROCESS)

    async def stage(self, backup: NewBackup, body: UploadBody, final: str) -> StagedBackup:
        """Stream the body to a staging key; `final` is where `commit` copies it. With the
        body's sha256 known before it (the appliance's digest) the body goes straight to
        `final` with its metadata and the store's own check, as a multipart upload that
        only the commit completes."""
        if backup.expected_sha256 is not None:
            small = backup.size <= min(HELD_BODY_BYTES, self._config.multipart_threshold_bytes)
            if small and self._held.take(backup.size):
                return await self._held_for_commit(backup, body, final)
            return await self._parts_in_place(backup, body, final)
        staging = f"{self._config.prefix}{STAGING_PREFIX}{secrets.token_hex(16)}"
        digest = hashlib.sha256()
        signed = self._signed
        cfg = self._config
        feed = _Feed(body, digest)
        upload_id: str | None = None
        step = "put_object"
        try:
            # Some stores (SeaweedFS) create a missing bucket on PutObject: the gateway never
            # creates buckets, and a missing one is a 502 here as on every other route.
            step = "head_bucket"
            await self._require_bucket()
            step = "put_object"
            if backup.size <= cfg.multipart_threshold_bytes:
                answer = await signed.put_stream(
                    staging,
                    backup.size,
                    feed.chunks(backup.size),
                    read_seconds=self._answer_seconds(backup.size),
                )
                require_ok(answer, step)
            else:
                step = "create_multipart_upload"
                created = await self._client.create_multipart_upload(Bucket=cfg.bucket, Key=staging)
                upload_id = created["UploadId"]
                parts = []
                remaining = backup.size
                number = 0
                step = "upload_part"
                while remaining:
                    number += 1
                    size = min(cfg.multipart_part_bytes, remaining)
                    answer = await signed.put_stream(
                        staging,
                        size,
                        feed.chunks(size),
                        {"partNumber": str(number), "uploadId": upload_id},
                        read_seconds=self._answer_seconds(size),
                    )
                    require_ok(answer, step)
                    etag = next((v for k, v in answer.headers.items() if k.lower() == "etag"), "")
                    parts.append({"PartNumber": number, "ETag": etag})
                    remaining -= size
                step = "complete_multipart_upload"
                await self._client.complete_multipart_upload(
                    Bucket=cfg.bucket,
                    Key=staging,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                )
                upload_id = None
        except BaseException as exc:
            # never awaited here: the caller may be cancelled (deadline, client gone)
            _background(self.remove(staging, upload_id))
            raise _failure(exc, feed.error, step) from None
        return _StagedS3(self, staging, final, backup.info(digest.hexdigest()), backup.uploader_ip)

    async def _held_for_commit(
        self, backup: NewBackup, body: UploadBody, final: str
    ) -> StagedBackup:
        """The whole body read into memory (its size already taken from the budget) and
        hashed: a sha256 other than the appliance's digest is refused here, before any
        write. The commit puts it in place (`_HeldForCommit`)."""
        assert backup.expected_sha256 is not None
        digest = hashlib.sha256()
        feed = _Feed(body, digest)
        step = "head_bucket"
        try:
            await self._require_bucket()  # before the body: a missing bucket reads none of it
            step = "read_body"
            chunks = [data async for data in feed.chunks(backup.size)]
        except BaseException as exc:
            self._held.give_back(backup.size)
            raise _failure(exc, feed.error, step) from None
        if digest.hexdigest() != backup.expected_sha256:
            self._held.give_back(backup.size)
            raise ChecksumRefused("the body's sha256 differs from the digest")
        info = backup.info(backup.expected_sha256)
        return _HeldForCommit(self, self._held, final, chunks, info, backup.uploader_ip)

    async def put_in_place(
        self, final: str, chunks: list[bytes], info: BackupInfo, ip: str
    ) -> None:
        """One PutObject at the final key with the metadata and the checksum the store
        verifies (a store that refuses it: ChecksumRefused, nothing stored). Bounded as a
        whole: the client's read timeout only starts once the body is sent, and a store that
        stops reading it would hold the body (and its share of the budget) for ever."""
        checksum = base64.b64encode(bytes.fromhex(info.sha256)).decode()
        async with asyncio.timeout(self._timeout + self._answer_seconds(info.size)):
            answer = await self._signed.put_stream(
                final,
                info.size,
                _sent(chunks),
                read_seconds=self._answer_seconds(info.size),
                headers={**metadata_headers(info, ip), "x-amz-checksum-sha256": checksum},
            )
        if checksum_refused(answer):
            raise ChecksumRefused("the store's sha256 of the body differs")
        require_ok(answer, "put_object")

    async def _parts_in_place(
        self, backup: NewBackup, body: UploadBody, final: str
    ) -> StagedBackup:
        """A multipart upload at the final key, created with the final metadata and
        ChecksumAlgorithm SHA256. Up to the threshold the body is one part, streamed, whose
        `x-amz-checksum-sha256` is the digest; above it each part is read into memory and
        hashed on the way, and goes up with its own checksum while the next is read
        (`PartsInFlight`). The store verifies each. Once every part is up, the gateway's
        sha256 of the whole body is compared with the appliance's digest: a mismatch aborts
        the upload before the refusal (ChecksumRefused), so nothing was ever visible.
        CompleteMultipartUpload is the commit (`_MultipartInPlace`): no staging key, no
        CopyObject, and nothing listed before it."""
        assert backup.expected_sha256 is not None
        cfg = self._config
        whole = hashlib.sha256()
        feed = _Feed(body, whole)
        headers = metadata_headers(backup.info(backup.expected_sha256), backup.uploader_ip)
        upload_id: str | None = None
        parts: list[dict[str, Any]] = []
        flight: PartsInFlight | None = None
        step = "head_bucket"
        try:
            await self._require_bucket()
            step = "create_multipart_upload"
            created = await self._client.create_multipart_upload(
                Bucket=cfg.bucket,
                Key=final,
                ChecksumAlgorithm="SHA256",
                ContentType=headers["Content-Type"],
                Metadata={
                    name.removeprefix("x-amz-meta-"): value
                    for name, value in headers.items()
                    if name.startswith("x-amz-meta-")
                },
            )
            upload_id = created["UploadId"]
            step = "upload_part"
            if backup.size <= cfg.multipart_threshold_bytes:
                # the whole body, streamed as one part: its checksum is the digest
                checksum = base64.b64encode(bytes.fromhex(backup.expected_sha256)).decode()
                sent = feed.chunks(backup.size)
                parts.append(
                    await self._part(final, upload_id, 1, backup.size, sent, checksum, backup.size)
                )
            else:
                flight = PartsInFlight(self._held, cfg.multipart_part_bytes, PARTS_IN_FLIGHT)
                # the store may persist the other parts in flight before it answers one
                persisting = cfg.multipart_part_bytes * PARTS_IN_FLIGHT
                remaining = backup.size
                number = 0
                while remaining:
                    size = min(cfg.multipart_part_bytes, remaining)
                    chunks, checksum = await flight.read_next(functools.partial(feed.part, size))
                    number += 1
                    sent = _sent(chunks)
                    del chunks  # held by the part's request alone
                    flight.send(
                        self._part(final, upload_id, number, size, sent, checksum, persisting)
                    )
                    del sent
                    remaining -= size
                parts = await flight.all_up()
            if whole.hexdigest() != backup.expected_sha256:
                raise ChecksumRefused("the body's sha256 differs from the digest")
        except ChecksumRefused:
            # refused before anything was completed: aborted before the answer says so
            await _awaited_in_background(self._abort_parts(final, upload_id, flight))
            raise
        except BaseException as exc:
            # never awaited here: the caller may be cancelled (deadline, client gone)
            _background(self._abort_parts(final, upload_id, flight))
            raise _failure(exc, feed.error, step) from None
        assert upload_id is not None
        info = backup.info(whole.hexdigest())
        return _MultipartInPlace(self, final, upload_id, parts, info)

    async def _abort_parts(
        self, final: str, upload_id: str | None, flight: PartsInFlight | None
    ) -> None:
        """The parts still going up stopped first: a part that lands after the abort would
        be kept by the store, out of any upload anyone completes or aborts."""
        if flight is not None:
            flight.cancel()
            await flight.stopped()
        await self.abort(final, upload_id)

    async def _part(
        self,
        final: str,
        upload_id: str,
        number: int,
        size: int,
        sent: AsyncIterator[bytes],
        checksum: str,
        persisting: int,
    ) -> dict[str, Any]:
        """UploadPart with the checksum the store verifies, its answer awaited as long as
        the store may take to persist `persisting` bytes; the part as the completion names
        it."""
        answer = await self._signed.put_stream(
            final,
            size,
            sent,
            {"partNumber": str(number), "uploadId": upload_id},
            read_seconds=self._answer_seconds(persisting),
            headers={"x-amz-checksum-sha256": checksum},
        )
        if checksum_refused(answer):
            raise ChecksumRefused(f"the store's sha256 of part {number} differs")
        require_ok(answer, "upload_part")
        etag = next((v for k, v in answer.headers.items() if k.lower() == "etag"), "")
        return {"PartNumber": number, "ETag": etag, "ChecksumSHA256": checksum}

    async def complete(
        self, key: str, upload_id: str, parts: list[dict[str, Any]], info: BackupInfo
    ) -> None:
        """CompleteMultipartUpload with each part's checksum. A retry of it whose first
        attempt landed (its answer lost) finds the upload gone: the backup at its key,
        whole, is the answer then."""
        try:
            await self._client.complete_multipart_upload(
                Bucket=self._config.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
            return
        except ClientError as exc:
            if error_code(exc) == "NoSuchUpload" and await self._landed(key, info):
                return
            message = str(exc.response.get("Error", {}).get("Message", ""))
            if not _refuses_checksum(error_code(exc), message):
                raise
        # refused: aborted before the answer says nothing was stored
        await _awaited_in_background(self.abort(key, upload_id))
        raise ChecksumRefused("the store refused the parts' checksums")

    async def _landed(self, key: str, info: BackupInfo) -> bool:
        head = await self._signed.head(key)
        headers = {name.lower(): value for name, value in head.headers.items()}
        return (
            head.status == 200
            and headers.get("content-length") == str(info.size)
            and headers.get("x-amz-meta-sha256") == info.sha256
        )

    async def abort(self, key: str, upload_id: str | None) -> None:
        """Best effort: a multipart upload nobody will complete (its parts dropped). One
        already gone (completed, or aborted before) is nothing to do."""
        if upload_id is None:
            return
        try:
            async with asyncio.timeout(self._timeout):
                await self._client.abort_multipart_upload(
                    Bucket=self._config.bucket, Key=key, UploadId=upload_id
                )
        except ClientError as exc:
            if error_code(exc) != "NoSuchUpload":
                log.warning("s3 multipart upload not aborted: %s", reason(exc))
        except (TimeoutError, *STORE_FAILURES) as exc:
            log.warning(
                "s3 multipart upload not aborted (a lifecycle rule aborting incomplete "
                "uploads clears it): %s",
                reason(exc),
            )

    def _answer_seconds(self, size: int) -> float:
        """How long a store may take to answer once it has `size` new bytes to persist."""
        return self._config.read_timeout_seconds + size * PERSIST_SECONDS_PER_BYTE

    async def remove(self, staging: str, upload_id: str | None) -> None:
        """Best effort: a staging key (or multipart upload) nobody will commit."""
        try:
            async with asyncio.timeout(self._timeout):
                if upload_id is not None:
                    await self._client.abort_multipart_upload(
                        Bucket=self._config.bucket, Key=staging, UploadId=upload_id
                    )
                with contextlib.suppress(BackupNotFound):  # never written: nothing to remove
                    await self._delete_key(staging)
        except (TimeoutError, *STORE_FAILURES) as exc:
            log.warning(
                "s3 staging key not removed (a lifecycle rule on %s clears it): %s",
                STAGING_PREFIX,
                reason(exc),
            )

    async def copy_into_place(self, staging: str, final: str, info: BackupInfo, ip: str) -> None:
        """CopyObject with the metadata: the backup appears whole, checksum and all."""
        headers = {"x-amz-metadata-directive": "REPLACE", **metadata_headers(info, ip)}
        seconds = self._timeout + info.size * PERSIST_SECONDS_PER_BYTE
        answer = await self._signed.copy(staging, final, headers, seconds)

        # a long copy may answer 200 and report its failure in the body
        if b"<Error>" in answer.body:
            answer = Answer(500 if answer.status == 200 else answer.status, {}, answer.body)
        require_ok(answer, "copy_object")


async def _landing(step: str, work: Awaitable[None], left_behind: Callable[[bool], None]) -> None:
    """A commit's request (CopyObject, CompleteMultipartUpload); on a failure
    `left_behind(maybe_landed)` clears what is left in the background. A request whose
    answer was lost may have landed: the new id is nobody's yet, so it is removed rather
    than leave an upload the caller was told failed."""
    try:
        await work
    except (TimeoutError, *STORE_FAILURES) as exc:
        log.warning("s3 %s of an upload failed: %s; removing it", step, reason(exc))
        left_behind(True)
        raise StorageUnavailable(reason(exc)) from None
    except BaseException:
        left_behind(False)
        raise


def _failure(exc: BaseException, body_error: UploadIncomplete | None, step: str) -> BaseException:
    """What a failed upload raises: the client's body's own failure (the HTTP client
    reports it as its own connection error), a storage error as it is, a store's failure
    as StorageUnavailable (logged with the step it reached), anything else as it is."""
    if body_error is not None:
        return body_error
    if isinstance(exc, STORE_FAILURES) and not isinstance(exc, StorageError):
        exc = StorageUnavailable(reason(exc))
    if isinstance(exc, StorageUnavailable):
        log.warning("s3 %s of an upload failed: %s; nothing was stored", step, exc)
    return exc


def checksum_refused(answer: Answer) -> bool:
    """A PUT (or part) the store refused for its checksum: BadDigest, or InvalidRequest
    naming the checksum."""
    body = answer.body
    return answer.status == 400 and (
        b"<Code>BadDigest<" in body or (b"<Code>InvalidRequest<" in body and b"hecksum" in body)
    )


def _refuses_checksum(code: str, message: str) -> bool:
    return code == "BadDigest" or (code == "InvalidRequest" and "hecksum" in message)


async def _awaited_in_background(work: Any) -> None:
    """Await it, and let it finish should the caller be cancelled meanwhile."""
    task = asyncio.ensure_future(work)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)
    await asyncio.shield(task)


async def _sent(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


def metadata_headers(info: BackupInfo, ip: str) -> dict[str, str]:
    """The object's own headers: what a listing and a download read back."""
    return {
        "Content-Type": info.mimetype,
        # S3 metadata is ASCII: the filename goes percent-encoded, read back decoded
        "x-amz-meta-filename": quote(info.filename, safe=""),
        "x-amz-meta-sha256": info.sha256,
        "x-amz-meta-uploader-ip": ip,
        "x-amz-meta-uploaded-at": info.uploaded_at.isoformat(timespec="milliseconds"),
    }


class _MultipartInPlace(StagedBackup):
    """A multipart upload at the final key, every part up and the whole body's sha256 equal
    to the appliance's digest: `commit` completes it (the backup appears at once, whole),
    `discard` aborts it. Nothing is visible before the commit."""

    def __init__(
        self,
        uploads: Uploads,
        final: str,
        upload_id: str,
        parts: list[dict[str, Any]],
        info: BackupInfo,
    ) -> None:
        super().__init__(info)
        self._uploads = uploads
        self._final = final
        self._upload_id: str | None = upload_id
        self._parts = parts

    async def commit(self) -> None:
        uploads = self._uploads
        upload_id = self._upload_id
        assert upload_id is not None, "committed twice"
        final = self._final

        def left_behind(maybe_landed: bool) -> None:
            _background(uploads.abort(final, upload_id))
            if maybe_landed:
                _background(uploads.remove(final, None))

        work = uploads.complete(final, upload_id, self._parts, self.info)
        await _landing("complete_multipart_upload", work, left_behind)
        self._upload_id = None  # completed: nothing left to abort

    async def discard(self) -> None:
        upload_id, self._upload_id = self._upload_id, None
        await self._uploads.abort(self._final, upload_id)


class HeldBytes:
    """The bytes held in memory against a budget: small bodies until their commit, the
    second part of a digest upload in parts while the first goes up. Never waited for: an
    upload that finds the budget spent goes up another way."""

    def __init__(self, budget: int) -> None:
        self._budget = budget
        self.held = 0

    def take(self, size: int) -> bool:
        if self.held + size > self._budget:
            return False
        self.held += size
        return True

    def give_back(self, size: int) -> None:
        self.held -= size
        assert self.held >= 0, "given back twice"


class _HeldForCommit(StagedBackup):
    """A small body in memory, its sha256 equal to the appliance's digest: `commit` puts it
    at its final key in one PutObject (the backup appears at once, whole), `discard` drops
    it. Nothing is in the store before the commit."""

    def __init__(
        self,
        uploads: Uploads,
        held: HeldBytes,
        final: str,
        chunks: list[bytes],
        info: BackupInfo,
        ip: str,
    ) -> None:
        super().__init__(info)
        self._uploads = uploads
        self._held = held
        self._final = final
        self._chunks: list[bytes] | None = chunks  # None once committing or discarded
        self._ip = ip

    async def commit(self) -> None:
        # taken from the object: a discard meanwhile (request cancelled) leaves the budget
        # to this commit, which still sends the bytes
        chunks, self._chunks = self._chunks, None
        assert chunks is not None, "committed twice, or discarded"
        uploads, final = self._uploads, self._final

        def left_behind(maybe_landed: bool) -> None:
            if maybe_landed:
                _background(uploads.remove(final, None))

        try:
            work = uploads.put_in_place(final, chunks, self.info, self._ip)
            await _landing("put_object", work, left_behind)
        finally:
            self._held.give_back(self.info.size)

    async def discard(self) -> None:
        if self._chunks is not None:
            self._chunks = None
            self._held.give_back(self.info.size)


class _Feed:
    """The request body as an S3 request body: hashed on the way. A failure of the body
    itself (cut short, client gone) is kept, since the HTTP client reports it as its own
    connection error."""

    def __init__(self, body: UploadBody, digest: Any) -> None:
        self._body = body
        self._digest = digest
        self.error: UploadIncomplete | None = None

    async def chunks(self, size: int) -> AsyncIterator[bytes]:
        remaining = size
        while remaining:
            try:
                data = await self._body.read(min(remaining, STREAM_CHUNK_BYTES))
            except UploadIncomplete as exc:
                self.error = exc
                raise
            self._digest.update(data)
            remaining -= len(data)
            yield data

    async def part(self, size: int) -> tuple[list[bytes], str]:
        """The next `size` bytes in memory, with their own sha256 (base64, as
        `x-amz-checksum-sha256` carries it)."""
        digest = hashlib.sha256()
        chunks: list[bytes] = []
        async for data in self.chunks(size):
            digest.update(data)
            chunks.append(data)
        return chunks, base64.b64encode(digest.digest()).decode()


class _StagedS3(StagedBackup):
    def __init__(self, uploads: Uploads, staging: str, final: str, info: BackupInfo, ip: str):
        super().__init__(info)
        self._uploads = uploads
        self._staging = staging
        self._final = final
        self._ip = ip

    async def commit(self) -> None:
        uploads = self._uploads
        staging, final = self._staging, self._final

        def left_behind(maybe_landed: bool) -> None:
            if maybe_landed:
                _background(uploads.remove(final, None))
            _background(uploads.remove(staging, None))

        work = uploads.copy_into_place(staging, final, self.info, self._ip)
        await _landing("copy_object", work, left_behind)
        # before the answer, so a 201 leaves exactly the backup (a failure here is logged)
        await uploads.remove(self._staging, None)

    async def discard(self) -> None:
        await self._uploads.remove(self._staging, None)
