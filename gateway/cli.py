"""The `backup-gateway` command: serve, token, check-config, seed-demo, seed."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

from .busy_port import PortBusy, refuse_busy_port
from .config import Config, load_config
from .config_loader import ConfigError
from .directory import (
    DirectoryError,
    DirectoryUnavailable,
    create_directory,
    load_file_directory,
)
from .identity.tokens import DEFAULT_PERMISSIONS, mint_token
from .operations.health import cause_of

EXIT_CONFIG = 2
EXIT_UNREACHABLE = 1  # check-config: valid, but a configured server does not answer
MAX_PURGE_DAYS = 36500  # a century: the most a purge's cut-off can ask


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="backup-gateway", description="Delete appliance configuration backups, safely."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the HTTP server")
    serve.add_argument("--config", type=Path, required=True)
    serve.add_argument("--workers", type=int, help="processes sharing the port (SO_REUSEPORT)")

    check = commands.add_parser("check-config", help="validate a config and its files, then exit")
    check.add_argument("--config", type=Path, required=True)
    check.add_argument(
        "--probe",
        action="store_true",
        help="contact storage, the database and Redis too, naming each failure's cause",
    )

    token = commands.add_parser("token", help="print a signed access token (HMAC configs)")
    token.add_argument("--config", type=Path, required=True)
    token.add_argument("--org", required=True, help="the caller's organization id")
    token.add_argument("--role", required=True, help="owner, distributor, reseller or customer")
    token.add_argument(
        "--perm",
        action="append",
        dest="perms",
        metavar="PERMISSION",
        help=f"fills user.org_permissions; repeatable (default: {' '.join(DEFAULT_PERMISSIONS)})",
    )
    token.add_argument("--ttl", type=int, default=3600, help="seconds until expiry")
    token.add_argument("--user", default="u_cli", help="user id (sub)")

    secret = commands.add_parser(
        "set-secret",
        help="give a system of the file directory new appliance credentials (printed once)",
    )
    secret.add_argument("--config", type=Path, required=True)
    secret.add_argument("--system", required=True, help="the system's id")

    init_root = commands.add_parser(
        "init-root",
        help="create and mark the local backup root (once per new volume; see README)",
    )
    init_root.add_argument("--config", type=Path, required=True)

    check_bytes = commands.add_parser(
        "verify", help="re-read every backup and compare its sha256 (exit 1 on a corrupt one)"
    )
    check_bytes.add_argument("--config", type=Path, required=True)
    check_bytes.add_argument("--system", help="only this system's backups (its id)")
    check_bytes.add_argument(
        "--max-bytes-per-second", type=float, help="read at most this fast (default: no limit)"
    )

    orphans = commands.add_parser(
        "orphans", help="list the folders no system maps to (--purge: delete the old ones)"
    )
    orphans.add_argument("--config", type=Path, required=True)
    orphans.add_argument(
        "--purge", action="store_true", help="delete the orphans older than --older-than-days"
    )
    orphans.add_argument(
        "--older-than-days", type=float, help="with --purge: the newest backup is older than this"
    )

    demo = commands.add_parser("seed-demo", help="write the demo backups into local storage")
    demo.add_argument("--config", type=Path, required=True)

    fill = commands.add_parser(
        "seed", help="fill storage with backups and write a matching directory file (load tests)"
    )
    fill.add_argument("--config", type=Path, required=True)
    fill.add_argument("--systems", type=int, required=True)
    fill.add_argument("--backups", type=int, required=True, help="backups per system")
    fill.add_argument("--size", type=int, default=1024, help="bytes per backup")
    fill.add_argument("--ids-out", type=Path, help="write 'system_id backup_id' lines here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config)
        if args.command == "serve":
            from .serve import run_server

            if args.workers is not None:
                if args.workers < 1:
                    raise ConfigError("--workers", "must be at least 1")
                config = dataclasses.replace(
                    config, server=dataclasses.replace(config.server, workers=args.workers)
                )
            # A busy port first: _check may write (the secret file, the limits' file).
            refuse_busy_port(config.server, args.config)
            # Fail fast, before any worker starts, on a broken directory or key.
            _check(config)
            return run_server(config, args.config)
        if args.command == "check-config":
            from .tools.config_check import local_root, probe_storage

            _check(config)
            print(f"{args.config}: ok")
            # Without --probe nothing is contacted: the files alone (a root not marked).
            marker = local_root(config, args.config)
            if marker is not None:
                print(f"{marker[0]}: {marker[1] or 'ok'}")
            failed = marker is not None and marker[1] is not None
            if args.probe:
                reached = asyncio.run(probe_storage(config)) + asyncio.run(_reach(config))
                failed = not all([_report(line) for line in reached]) or failed
            return EXIT_UNREACHABLE if failed else 0
        if args.command == "token":
            if not config.auth.is_hmac:
                raise ConfigError("auth.algorithms", "token needs an HMAC algorithm (HS256)")
            perms = tuple(args.perms) if args.perms else DEFAULT_PERMISSIONS
            print(mint_token(config.auth, args.org, args.role, perms, args.ttl, args.user))
            return 0
        if args.command == "set-secret":
            from .tools.appliance_secret import set_system_secret

            key, made = set_system_secret(config, args.system)
            print(f"{args.system} ({key}): appliance credentials for the upload route,")
            print("shown once; only a salted hash of the secret is stored:")
            print(f"  system_key:    {key}")
            print(f"  system_secret: {made}")
            return 0
        if args.command == "init-root":
            from storage_backends.local import ROOT_MARKER, mark_root

            if config.storage.backend != "local":
                raise ConfigError("storage.backend", "init-root marks a local backup root")
            root = config.storage.local.root
            if not mark_root(root, only_if_in_use=False):
                print(f"backup-gateway: cannot mark {root}", file=sys.stderr)
                return 1
            print(f"{root}: marked ({ROOT_MARKER})")
            return 0
        if args.command == "verify":
            from .verify_command import verify

            return asyncio.run(
                verify(config, args.system, max_bytes_per_second=args.max_bytes_per_second)
            )
        if args.command == "orphans":
            from .orphans_command import orphans

            days = args.older_than_days
            if not args.purge and days is not None:
                raise ConfigError("--older-than-days", "is read only with --purge")
            # nan, inf and 1e400 parse as floats: a cut-off is a finite number of days
            if args.purge and (days is None or not 0 <= days <= MAX_PURGE_DAYS):
                raise ConfigError(
                    "--older-than-days", f"--purge needs a number of days, 0 to {MAX_PURGE_DAYS}"
                )
            return asyncio.run(orphans(config, days))
        if args.command == "seed-demo":
            from .tools.demo import seed_demo

            # `make run` seeds, then serves: with the port taken, neither happens
            refuse_busy_port(config.server, args.config)
            _check(config)
            for line in seed_demo(config):
                print(line)
            return 0
        if args.command == "seed":
            from .tools.seeding import seed

            count, seconds = seed(config, args.systems, args.backups, args.size, args.ids_out)
            print(
                f"seeded {count} backups in {seconds:.1f}s into {config.storage.backend}; "
                f"directory written to {config.directory.path}"
            )
            return 0
    except ConfigError as exc:
        print(f"backup-gateway: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except DirectoryError as exc:
        print(f"backup-gateway: directory error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except PortBusy as exc:
        print(f"backup-gateway: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return 1


def _check(config: Config) -> None:
    """Everything start-up would refuse: directory file, signing keys, a local root that
    folds case, a state folder that cannot hold the limits' file. Never whether storage
    answers (that is readiness's)."""
    from storage_backends import refused_at_start

    from .identity.tokens import TokenVerifier

    if config.directory.kind == "file":
        load_file_directory(config.directory.path)
    TokenVerifier(config.auth)
    refused = refused_at_start(config.storage)
    if refused is not None:
        raise ConfigError(*refused)
    if not config.redis.url:
        from .backups.limits.host_file import HostFile

        HostFile.at(config.server.state_dir).close()  # the workers' shared limits


async def _reach(config: Config) -> list[tuple[str, str | None]]:
    """(server, None when it answers, else why not) for the platform's servers configured."""
    results: list[tuple[str, str | None]] = []
    if config.directory.kind == "postgres":
        directory = create_directory(config.directory)
        await directory.start()
        try:
            await directory.check_ready()
            results.append(("directory (postgres)", None))
        except DirectoryUnavailable as exc:
            results.append(("directory (postgres)", str(exc)))
        finally:
            await directory.close()
    url = config.redis.url
    if url:
        from redis.exceptions import RedisError

        from .redis_clients import TIMEOUT_SECONDS, redis_client

        for name, db, used in (
            ("redis revocation", config.auth.revocation.db, config.auth.revocation.enabled),
            (
                "redis usage counter",
                config.storage.usage_counter.db,
                config.storage.usage_counter.enabled,
            ),
        ):
            if not used:
                continue
            client = redis_client(url, db)
            try:
                async with asyncio.timeout(TIMEOUT_SECONDS):
                    await client.ping()
                results.append((f"{name} (db {db})", None))
            except (RedisError, OSError, TimeoutError) as exc:
                results.append((f"{name} (db {db})", cause_of(exc)))  # the error's own text
            finally:
                await client.aclose()
    return results


def _report(result: tuple[str, str | None]) -> bool:
    name, problem = result
    print(f"{name}: {'answers' if problem is None else 'does not answer: ' + problem}")
    return problem is None


if __name__ == "__main__":
    sys.exit(main())
