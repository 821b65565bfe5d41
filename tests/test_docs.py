"""The documentation holds what it says (issue #27): every complete config example passes
`check-config`, the README stays short, no link leaves the repository, and the systemd unit
verifies.

A fenced ```yaml block is a complete config when its first line is `# config: complete`
(docs/configuration.md, "Examples in these docs"); other yaml blocks are fragments and
only have to parse. A complete example runs in a folder of its own beside a copy of the
demo `directory.yaml` (under every name its `directory.path` gives), with each `${VAR}` it
reads set to a dummy of the right shape, its port moved to a free one, and a local root
made and marked by `init-root` as an operator would. `check-config` then must find it
valid: exit 0, or exit 1 when the only failures are servers it could not reach (a
PostgreSQL or Redis that this test does not run).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMPLETE = "# config: complete"
README_MAX_LINES = 200

FENCE = re.compile(r"^```yaml[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
PORT = re.compile(r"(\bport:\s*)\d+\b")
VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# [text](target) and ![alt](target), not inside code spans or fences (stripped first)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE = re.compile(r"^```.*?^```|`[^`\n]*`", re.MULTILINE | re.DOTALL)
FENCES = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def _blocks() -> list[tuple[str, int, str]]:
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            found.append((page.relative_to(ROOT).as_posix(), line, match.group(1)))
    return found


BLOCKS = _blocks()
COMPLETE_BLOCKS = [b for b in BLOCKS if b[2].lstrip().startswith(COMPLETE)]


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _dummy(name: str) -> str:
    """A value of the shape the variable's name asks for; servers nothing listens on."""
    upper = name.upper()
    if upper.endswith("PORT"):
        return _free_port()
    if "DATABASE" in upper or "DSN" in upper or "POSTGRES" in upper:
        return "postgresql://backup_gateway_ro@127.0.0.1:1/platform"
    if "REDIS" in upper and upper.endswith("URL"):
        return "redis://127.0.0.1:1/0"
    if upper.endswith("URL"):
        return "http://127.0.0.1:1"
    if "DOMAIN" in upper:
        return "platform.example.com"
    # long enough for a JWT secret (>= 32 bytes), a safe id for an organization
    return "dummy-0123456789abcdef0123456789abcdef"


def test_the_readme_is_at_most_200_lines() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/"


def test_the_docs_show_complete_configs() -> None:
    pages = {page for page, _, _ in COMPLETE_BLOCKS}
    assert "README.md" in pages
    assert {"docs/configuration.md", "docs/storage-s3.md"} <= pages


@pytest.mark.parametrize(("page", "line", "block"), BLOCKS, ids=[f"{p}:{n}" for p, n, _ in BLOCKS])
def test_every_yaml_block_parses(page: str, line: int, block: str) -> None:
    yaml.safe_load(block)


@pytest.mark.parametrize(
    ("page", "line", "block"), COMPLETE_BLOCKS, ids=[f"{p}:{n}" for p, n, _ in COMPLETE_BLOCKS]
)
def test_every_complete_config_example_passes_check_config(
    page: str, line: int, block: str, tmp_path: Path
) -> None:
    config = tmp_path / "config.yaml"
    # check-config refuses a port in use: the example's own port may be taken on this host
    config.write_text(PORT.sub(lambda m: m.group(1) + _free_port(), block), encoding="utf-8")
    parsed = yaml.safe_load(block) or {}
    directory = (parsed.get("directory") or {}).get("path", "directory.yaml")
    if (parsed.get("directory") or {}).get("kind", "file") == "file":
        target = tmp_path / directory
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / "directory.yaml", target)
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("AWS_", "GATEWAY_", "S3_", "REDIS", "DATABASE"))
    }
    env.update({name: _dummy(name) for name in VARIABLE.findall(block)})
    if (parsed.get("storage") or {}).get("backend", "local") == "local":
        # as an operator does once for a new volume: create and mark the root
        made = _gateway("init-root", config, tmp_path, env)
        assert made.returncode == 0, f"{page}:{line}: {made.stdout}{made.stderr}"
    result = _gateway("check-config", config, tmp_path, env)
    where = f"{page}:{line}: {result.stdout}{result.stderr}"
    assert result.returncode in (0, 1), where
    assert f"{config}: ok" in result.stdout, where
    if result.returncode == 1:
        # valid; only the servers the test does not run failed to answer
        checks = [x for x in result.stdout.splitlines()[1:] if x.strip()]
        assert checks and all(
            x.endswith(("answers", ": ok")) or "does not answer" in x for x in checks
        ), where


def _gateway(
    command: str, config: Path, folder: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", command, "--config", str(config)],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings."""
    text = FENCES.sub("", page.read_text(encoding="utf-8"))
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", text, re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def _links() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        text = CODE.sub("", page.read_text(encoding="utf-8"))
        for target in LINK.findall(text):
            found.append((page.relative_to(ROOT).as_posix(), target))
    return found


LINKS = _links()


def test_the_pages_link_to_each_other() -> None:
    assert len(LINKS) >= 20  # the README's map of docs/ and the pages' cross-references


@pytest.mark.parametrize(("page", "target"), LINKS, ids=[f"{p}->{t}" for p, t in LINKS])
def test_no_link_leaves_the_repository(page: str, target: str) -> None:
    assert not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE), (
        f"{page}: {target} points outside the repository; say it in the project's own words"
    )
    source = ROOT / page
    path_part, _, anchor = target.partition("#")
    resolved = (source.parent / path_part).resolve() if path_part else source
    assert resolved.is_relative_to(ROOT), f"{page}: {target} leaves the repository"
    assert resolved.exists(), f"{page}: {target} does not exist"
    if anchor and resolved.suffix == ".md":
        assert anchor in _anchors(resolved), f"{page}: no heading for #{anchor} in {resolved.name}"


UNIT = ROOT / "deploy" / "systemd" / "backup-gateway.service"


def test_the_systemd_unit_is_hardened() -> None:
    unit = UNIT.read_text(encoding="utf-8")
    for line in (
        "ProtectSystem=strict",
        "ReadWritePaths=",
        "NoNewPrivileges=true",
        "User=backup-gateway",
        "LimitNOFILE=",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ):
        assert line in unit


def test_the_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here")
    # verify wants ExecStart's program to exist: this checkout's stands in for /opt's
    program = Path(sys.executable).parent / "backup-gateway"
    unit = tmp_path / UNIT.name
    unit.write_text(
        UNIT.read_text(encoding="utf-8").replace(
            "/opt/backup-gateway/bin/backup-gateway", str(program)
        ),
        encoding="utf-8",
    )
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    problems = [x for x in result.stderr.splitlines() if UNIT.name in x]
    assert not problems, "\n".join(problems)
