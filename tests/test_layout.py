"""The layout's rules (DESIGN.md §6), checked by reading every module's imports.

Each module of `gateway` and `storage_backends` belongs to a unit: a package of `gateway`,
the config modules, the wiring modules at the top, or `storage_backends`. `ALLOWED` says
which units a unit may import; anything else is a back-edge and fails here. Inside
`storage_backends`, a backend package is private to itself: others import the package,
never its modules. Modules named `_something` are private to their package everywhere.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("gateway", "storage_backends")

# unit -> the units it may import (its own unit is always allowed)
ALLOWED: dict[str, set[str]] = {
    "storage_backends": set(),
    "config": {"storage_backends"},
    # the log format is storage_backends.log_format, shared with the local I/O process
    "telemetry": {"config", "storage_backends"},
    "identity": {"config", "telemetry"},
    "directory": {"config", "telemetry"},
    "http": {"config", "telemetry", "identity", "storage_backends"},
    # the fleet's index is told of every upload, delete and prune (DESIGN.md §13)
    "backups": {
        "config",
        "telemetry",
        "identity",
        "directory",
        "http",
        "fleet",
        "storage_backends",
    },
    # the index of storage and the orphans: read from storage and the directory only
    "fleet": {"config", "telemetry", "directory", "storage_backends"},
    "operations": {"config", "telemetry", "http"},
    # config_check reports a failed probe as readiness words it (operations.health)
    "tools": {"config", "identity", "directory", "operations", "storage_backends"},
    "wiring": {
        "config",
        "telemetry",
        "identity",
        "directory",
        "http",
        "backups",
        "fleet",
        "operations",
        "tools",
        "storage_backends",
    },
}
CONFIG_MODULES = {"gateway.config", "gateway.config_loader"}
BACKEND_PACKAGES = {"storage_backends.local", "storage_backends.s3"}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def unit_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "storage_backends":
        return "storage_backends"
    if module in CONFIG_MODULES:
        return "config"
    if len(parts) >= 2 and (ROOT / "gateway" / parts[1]).is_dir():
        return parts[1]
    return "wiring"  # gateway itself, app, routes, cli, serve, gunicorn, __main__


def imports_of(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute module) for every import in the file (a module under `root`),
    relative ones resolved; whether a name is a module is asked of the real tree."""
    module = module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # `from pkg import mod` names a module too
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                if (ROOT / Path(*candidate.split("."))).with_suffix(".py").exists() or (
                    ROOT / Path(*candidate.split("."))
                ).is_dir():
                    found.append((node.lineno, candidate))
    return [(line, name) for line, name in found if name.split(".")[0] in SOURCES]


def all_modules() -> list[Path]:
    return sorted(p for source in SOURCES for p in (ROOT / source).rglob("*.py"))


def violations(modules: list[Path], root: Path = ROOT) -> list[str]:
    found = []
    for path in modules:
        importer = module_name(path, root)
        unit = unit_of(importer)
        for line, target in imports_of(path, root):
            where = f"{path.relative_to(root)}:{line} imports {target}"
            target_unit = unit_of(target)
            if target_unit != unit and target_unit not in ALLOWED[unit]:
                found.append(f"{where}: {unit} may not import {target_unit}")
            parts = target.split(".")
            for depth in range(1, len(parts)):
                if parts[depth].startswith("_") and not parts[depth].startswith("__"):
                    owner = ".".join(parts[:depth])
                    if not (importer == owner or importer.startswith(owner + ".")):
                        found.append(f"{where}: private module of {owner}")
            for backend in BACKEND_PACKAGES:
                inside = importer == backend or importer.startswith(backend + ".")
                if target.startswith(backend + ".") and not inside:
                    found.append(f"{where}: {backend}'s modules are private to it")
    return found


def test_every_module_belongs_to_a_known_unit() -> None:
    units = {unit_of(module_name(p)) for p in all_modules()}
    assert units <= set(ALLOWED), units - set(ALLOWED)


def test_no_import_runs_back_up() -> None:
    assert violations(all_modules()) == []


def test_every_package_says_what_it_owns() -> None:
    for init in sorted((ROOT / "gateway").glob("*/__init__.py")) + sorted(
        (ROOT / "storage_backends").glob("*/__init__.py")
    ):
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert doc and "import" in doc, (
            f"{init.relative_to(ROOT)}: docstring must say what it owns and may import"
        )


@pytest.mark.parametrize(
    ("where", "line", "why"),
    [
        (
            "gateway/identity/principal.py",
            "from ..http.errors import ApiError",
            "identity may not import http",
        ),
        (
            "gateway/telemetry/metrics.py",
            "from ..backups import storage",
            "telemetry may not import backups",
        ),
        (
            "storage_backends/base.py",
            "from gateway.config import Config",
            "storage_backends may not import config",
        ),
        (
            "gateway/tools/demo.py",
            "from storage_backends.local.fs import SIDECAR_SUFFIX",
            "private to it",
        ),
        (
            "gateway/backups/delete.py",
            "from storage_backends.s3.store import S3BackupStore",
            "private to it",
        ),
    ],
)
def test_a_back_edge_added_by_hand_fails(tmp_path: Path, where: str, line: str, why: str) -> None:
    """The checker itself: the same module with one bad import added is reported. The copy
    is planted under tmp_path, at the same place in a tree of its own: never in the source."""
    planted = tmp_path / where
    planted.parent.mkdir(parents=True)
    planted.write_text((ROOT / where).read_text(encoding="utf-8") + f"\n{line}\n", "utf-8")
    found = violations([planted], root=tmp_path)
    assert any(why in v for v in found), found


def test_the_token_library_is_behind_one_module() -> None:
    """python-jose is pinned for unfixed CVEs: one module may import it, so one module
    proves they are unreachable (tests/test_tokens.py)."""
    importers = set()
    for path in all_modules():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = (
                [a.name for a in node.names] if isinstance(node, ast.Import)
                else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )  # fmt: skip
            if any(n == "jose" or n.startswith("jose.") for n in names):
                importers.add(module_name(path))
    assert importers == {"gateway.identity.tokens"}


# a library's internals, by the names the gateway reaches for
LIBRARY_INTERNALS = (
    "output_size",
    "_messages",
    "_srcfile",
    "_expiry_time",
    "super().server",
    "site._server",
    "botocore.retries",  # "not a public interface", says botocore.retries.standard
)


def test_library_internals_are_used_in_their_modules_only() -> None:
    """Each sits in a module named `*_internals`, whose test (tests/test_library_internals.py)
    fails when the library changes underneath it."""
    found = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in all_modules()
        if not path.stem.endswith("_internals")
        for name in LIBRARY_INTERNALS
        if name in path.read_text(encoding="utf-8")
    ]
    assert found == []
