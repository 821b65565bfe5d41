"""Every use of botocore's internals, each with its test in tests/test_library_internals.py
(it fails when botocore changes underneath it)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from botocore.awsrequest import AWSResponse
from botocore.parsers import create_parser
from botocore.retries import quota, standard


def credentials_expiry(credentials: Any) -> datetime | None:
    """When temporary credentials (a role, web identity, SSO) expire; None for static ones.
    botocore keeps the time in a private attribute and offers no public reader."""
    expiry = getattr(credentials, "_expiry_time", None)
    return expiry if isinstance(expiry, datetime) else None


class StandardRetries:
    """botocore's `standard` retry mode for requests sent outside a botocore client: its
    classifier (transient codes such as RequestTimeout, throttling codes such as SlowDown,
    500/502/503/504, connection errors and timeouts), its backoff, and its retry quota, one
    per instance as botocore keeps one per client. `botocore.retries.standard` says of
    itself that it is not a public interface; its parts are used exactly as botocore's own
    RetryHandler wires them."""

    def __init__(self, max_attempts: int, service_model: Any) -> None:
        # `service_model`: the S3 client's (`client.meta.service_model`), whose operations
        # say which of their errors are modelled as retryable
        self._service = service_model
        detector = standard.ThrottlingErrorDetector(standard.RetryEventAdapter())
        self._conditions = standard.StandardRetryConditions(max_attempts=max_attempts)
        self._backoff = standard.ExponentialBackoff(
            service_name=service_model.service_id.hyphenize(), throttling_detector=detector
        )
        self._quota = standard.RetryQuotaChecker(quota.RetryQuota(), detector)
        self._parser = create_parser("rest-xml")  # S3's error bodies, read as botocore reads them

    def delay(
        self,
        operation: str,
        attempt: int,
        request_context: dict[str, Any],
        status: int | None = None,
        headers: dict[str, str] | None = None,
        body: bytes = b"",
        error: Exception | None = None,
    ) -> float | None:
        """After attempt `attempt` (from 1) of S3 `operation` (HeadObject) got this answer,
        or raised this botocore `error`: the seconds to wait before the next attempt, or
        None when there is none (not retryable, attempts used up, or the quota drained).
        A retry takes its cost from the quota; `request_context` is the one request's,
        across its attempts."""
        response = parsed = None
        if status is not None:
            response = AWSResponse("", status, headers or {}, None)
            if status >= 300:  # a success is never retried: no parse on the hot path
                parsed = self._parser.parse(
                    {"status_code": status, "headers": headers or {}, "body": body}, None
                )
        context = standard.RetryContext(
            attempt_number=attempt,
            operation_model=self._service.operation_model(operation),
            parsed_response=parsed,
            http_response=response,
            caught_exception=error,
            request_context=request_context,
        )
        if not self._conditions.is_retryable(context):
            return None
        if not self._quota.acquire_retry_quota(context):
            return None
        delay: float = self._backoff.delay_amount(context)
        return delay

    def answered(self, request_context: dict[str, Any], status: int) -> None:
        """A request's final answer: a 2xx gives back what its retries took (or a little,
        when it needed none), as botocore does after each call."""
        self._quota.release_retry_quota(request_context, AWSResponse("", status, {}, None))
