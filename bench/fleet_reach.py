"""The file directory's reach walk for the fleet page (DESIGN.md §13):

    .venv/bin/python bench/fleet_reach.py [--distributors 10] [--rounds 5]

A directory of --distributors distributors, ten resellers each, a hundred customers a
reseller and ten systems a customer (100,000 systems at 10), walked by
`InMemoryDirectory.reachable_systems` for a customer, a reseller, a distributor and the
Owner, against the same rule (`reaches`) applied to every served system in id order (how
the walk went before it read the reach from the caller's own organizations). Milliseconds
a walk, the median of --rounds, both in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gateway.directory.base import Organization, System, SystemInTree
from gateway.directory.file import InMemoryDirectory
from gateway.directory.hierarchy import reaches


def build(distributors: int) -> InMemoryDirectory:
    organizations = [Organization("org_owner", "owner")]
    systems = []
    for d in range(distributors):
        organizations.append(Organization(f"d{d}", "distributor", "org_owner"))
        for r in range(10):
            organizations.append(Organization(f"d{d}r{r}", "reseller", f"d{d}"))
            for c in range(100):
                customer = f"d{d}r{r}c{c}"
                organizations.append(Organization(customer, "customer", f"d{d}r{r}"))
                for k in range(10):
                    systems.append(System(f"sys_{customer}_{k}", customer, f"K-{customer}-{k}"))
    return InMemoryDirectory(organizations, systems)


async def walked(directory: InMemoryDirectory, acting: Organization) -> int:
    seen = 0
    async for batch in directory.reachable_systems(acting):
        seen += len(batch)
    return seen


async def every_system(directory: InMemoryDirectory, acting: Organization) -> int:
    organizations = {o.id: o for o in directory.organizations}
    seen = 0
    for system in sorted(directory.systems, key=lambda s: s.id):
        organization = organizations.get(system.organization_id)
        parent = organization.parent if organization else None
        tree = SystemInTree(system, organization, organizations.get(parent) if parent else None)
        seen += reaches(acting, tree)
    return seen


async def main(distributors: int, rounds: int) -> None:
    directory = build(distributors)
    await walked(directory, Organization("org_owner", "owner"))  # its index, made once
    print(f"# {len(directory.systems)} systems, median of {rounds} rounds")
    for who in ("d0r0c0", "d0r0", "d0", "org_owner"):
        acting = await directory.organization(who)
        assert acting is not None
        times: dict[str, list[float]] = {"walk": [], "every": []}
        for _ in range(rounds):
            for name, way in (("walk", walked), ("every", every_system)):
                started = time.perf_counter()
                seen = await way(directory, acting)
                times[name].append(1000 * (time.perf_counter() - started))
        walk, every = statistics.median(times["walk"]), statistics.median(times["every"])
        print(
            f"{acting.role:12} reach {seen:7}: walk {walk:8.2f} ms, "
            f"every system {every:8.2f} ms, ratio {every / walk:8.1f}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--distributors", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.distributors, args.rounds))
