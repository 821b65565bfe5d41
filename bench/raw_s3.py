"""(c) The storage path's ceiling: aiobotocore alone doing HeadObject+DeleteObject pairs."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session


def raw_client(endpoint: str, concurrency: int) -> Any:
    """aiobotocore as an application would use it: one client, path style, standard retries
    (the credentials are the bench servers' own)."""
    config = AioConfig(
        max_pool_connections=concurrency,
        retries={"mode": "standard"},
        s3={"addressing_style": "path"},
    )
    return get_session().create_client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=config,
    )


async def main(endpoint: str, bucket: str, ids_file: str, concurrency: int, seconds: float):
    keys = []
    with open(ids_file) as f:
        for line in f:
            sid, bid = line.split()
            index = int(sid.removeprefix("sys_"))
            keys.append(f"org_cust_{index:06d}/SEED-{index:06d}/{bid}")
    latencies: list[float] = []
    errors = 0
    position = 0
    async with raw_client(endpoint, concurrency) as client:
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal position, errors
            while time.perf_counter() < deadline and position < len(keys):
                key = keys[position]
                position += 1
                started = time.perf_counter()
                try:
                    await client.head_object(Bucket=bucket, Key=key)
                    await client.delete_object(Bucket=bucket, Key=key)
                except Exception:
                    errors += 1
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    pct = lambda p: latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else 0  # noqa: E731
    print(
        "RAWJSON "
        + json.dumps(
            {
                "requests": len(latencies),
                "duration_s": elapsed,
                "non2xx": errors,
                "p50_us": pct(0.5) * 1e6,
                "p99_us": pct(0.99) * 1e6,
                "deleted": len(latencies) - errors,
            }
        )
    )


if __name__ == "__main__":
    endpoint, bucket, ids_file, concurrency, seconds = sys.argv[1:6]
    asyncio.run(main(endpoint, bucket, ids_file, int(concurrency), float(seconds)))
