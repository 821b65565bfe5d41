"""The file directory's reach walk (DESIGN.md §3, §13): it reads a caller's reach from the
caller's own organizations, its children's and its grandchildren's, not from every system.
Whatever the directory holds — deleted organizations, missing or deleted parents, an
organization its own parent, cycles, systems of unknown organizations — the walk gives
exactly the systems `reaches` accepts among all the served ones, in id order, each once."""

from __future__ import annotations

import asyncio

from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.directory.base import ROLES, Organization, System, SystemInTree
from gateway.directory.file import InMemoryDirectory
from gateway.directory.hierarchy import reaches

ORGS = [f"o{n}" for n in range(5)]  # and "gone": a parent no organization is
MOSTLY_LIVE = st.sampled_from([False, False, False, True])


@st.composite
def directories(draw: st.DrawFn) -> tuple[list[Organization], list[System]]:
    organizations = [
        Organization(
            org_id,
            draw(st.sampled_from(sorted(ROLES))),
            draw(st.sampled_from([None, "gone", *ORGS])),
            draw(MOSTLY_LIVE),
        )
        for org_id in draw(st.lists(st.sampled_from(ORGS), unique=True, min_size=1))
    ]
    systems = [
        System(f"sys_{n:02d}", draw(st.sampled_from([*ORGS, "gone"])), key, deleted)
        for n, (key, deleted) in enumerate(
            draw(
                st.lists(
                    st.tuples(st.sampled_from([None, "K1", "K2", "K3", "K4"]), MOSTLY_LIVE),
                    max_size=24,
                )
            )
        )
    ]
    return organizations, systems


def by_the_rule(
    organizations: list[Organization], systems: list[System], acting: Organization
) -> list[str]:
    known = {o.id: o for o in organizations}
    served = sorted((s for s in systems if not s.deleted and s.system_key), key=lambda s: s.id)
    reached = []
    for system in served:
        organization = known.get(system.organization_id)
        parent = organization.parent if organization is not None else None
        creator = known.get(parent) if parent is not None else None
        if reaches(acting, SystemInTree(system, organization, creator)):
            reached.append(system.id)
    return reached


# a distributor's reach through a live reseller to its customer, the deepest the rule goes
CHAIN = (
    [
        Organization("o0", "owner"),
        Organization("o1", "distributor", "o0"),
        Organization("o2", "reseller", "o1"),
        Organization("o3", "customer", "o2"),
        Organization("o4", "customer", "o1"),
    ],
    [System(f"sys_{n}", f"o{n}", f"K{n}") for n in range(5)],
)


@settings(max_examples=1000, deadline=None)
@given(directories())
@example(CHAIN)
def test_the_walk_gives_what_the_rule_accepts_among_every_system(
    drawn: tuple[list[Organization], list[System]],
) -> None:
    organizations, systems = drawn
    directory = InMemoryDirectory(organizations, systems)

    async def walked(acting: Organization) -> list[str]:
        return [s.id async for batch in directory.reachable_systems(acting) for s in batch]

    for acting in directory.organizations:
        expected = by_the_rule(organizations, systems, acting)
        assert asyncio.run(walked(acting)) == expected, acting
