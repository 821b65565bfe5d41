"""The S3 list's baseline: aiobotocore alone doing ListObjectsV2 + one HeadObject per key."""

from __future__ import annotations

import asyncio
import json
import sys
import time

from raw_s3 import raw_client  # bench/ is this script's folder, first on sys.path


async def main(endpoint: str, bucket: str, prefix: str, concurrency: int, seconds: float):
    latencies: list[float] = []
    errors = 0
    async with raw_client(endpoint, concurrency) as client:
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                try:
                    page = await client.list_objects_v2(Bucket=bucket, Prefix=prefix, Delimiter="/")
                    await asyncio.gather(
                        *(
                            client.head_object(Bucket=bucket, Key=o["Key"])
                            for o in page.get("Contents", [])
                        )
                    )
                except Exception:
                    errors += 1
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    pct = lambda p: latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else 0  # noqa: E731
    result = {
        "requests": len(latencies),
        "rps": len(latencies) / elapsed,
        "non2xx": errors,
        "p50_ms": pct(0.5) * 1000,
        "p99_ms": pct(0.99) * 1000,
    }
    print("RAWJSON " + json.dumps(result))


if __name__ == "__main__":
    endpoint, bucket, prefix, concurrency, seconds = sys.argv[1:6]
    asyncio.run(main(endpoint, bucket, prefix, int(concurrency), float(seconds)))
