"""requirements.txt is the lock of requirements.in: every package pinned with == and hashed, every
direct dependency present within its range, complete for this interpreter (the deployed runtime is
CPython 3.11 on Linux x86_64), and the environment the tests run in is exactly that lock."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
HASH = re.compile(r"--hash=sha256:[0-9a-f]{64}")


def logical_lines(path: Path) -> list[str]:
    """The file's requirement lines, continuations joined, comments and blank lines dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = (re.sub(r"(^|\s)#.*$", "", line).strip() for line in text.splitlines())
    return [line for line in lines if line]


def pins() -> dict[str, str]:
    found: dict[str, str] = {}
    for line in logical_lines(ROOT / "requirements.txt"):
        req = Requirement(line.split(" --hash")[0].strip())
        found[canonicalize_name(req.name)] = str(req.specifier).removeprefix("==")
    return found


def test_every_line_is_pinned_with_hashes_and_nothing_else():
    lines = logical_lines(ROOT / "requirements.txt")
    assert len(lines) >= 20, "requirements.txt looks empty: compile it with tools/lock.sh"
    for line in lines:
        assert not line.startswith("-"), f"an option in requirements.txt (index, find-links, -r, -e): {line[:80]}"
        spec, _, hashes = line.partition(" --hash")
        req = Requirement(spec.strip())
        assert len(req.specifier) == 1 and next(iter(req.specifier)).operator == "==", f"not pinned with ==: {spec}"
        assert req.url is None and not req.extras, f"no URLs or extras in the lock: {spec}"
        assert HASH.findall(line), f"{req.name} has no --hash"
        assert HASH.sub("", "--hash" + hashes).strip() == "", f"{req.name}: something other than hashes after the pin"
    names = [canonicalize_name(Requirement(line.split(" --hash")[0]).name) for line in lines]
    assert len(names) == len(set(names)), "a package is pinned twice"


def test_every_direct_dependency_is_locked_within_its_range():
    locked = pins()
    direct = [Requirement(line) for line in logical_lines(ROOT / "requirements.in")]
    assert direct and all(not r.url for r in direct)
    for req in direct:
        name = canonicalize_name(req.name)
        assert name in locked, f"{req.name} (requirements.in) is not in requirements.txt: run tools/lock.sh"
        assert Version(locked[name]) in req.specifier, f"{name}=={locked[name]} is outside {req.specifier}: run tools/lock.sh"


def test_the_lock_is_complete_for_this_interpreter():
    """Every dependency of every locked package (markers evaluated for this Python and platform) is
    locked too: with --require-hashes pip refuses anything unpinned, so a gap fails the deploy."""
    locked = pins()
    missing: list[str] = []
    for name in locked:
        for spec in metadata.requires(name) or []:
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate({**default_environment(), "extra": ""}):
                continue
            if canonicalize_name(req.name) not in locked:
                missing.append(f"{name} needs {req}")
    assert not missing, missing


def test_the_environment_is_exactly_the_lock_and_pip_accepts_it_offline():
    """The installed runtime packages are the locked versions, and pip in hash-checking mode finds
    nothing to fetch: `pip install --require-hashes --dry-run --no-index -r requirements.txt`.
    (A real offline install needs the wheels; this machine keeps no wheel cache, so the hashes are
    checked against downloaded files only by tools/setup.sh, on every fresh install.)"""
    locked = pins()
    wrong = {name: (version, metadata.version(name)) for name, version in locked.items()
             if Version(metadata.version(name)) != Version(version)}
    assert not wrong, f"installed versions differ from the lock (run tools/setup.sh): {wrong}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--require-hashes", "--dry-run", "--no-index",
         "--disable-pip-version-check", "-r", str(ROOT / "requirements.txt")],
        cwd=ROOT, env={**env, "PIP_CONFIG_FILE": os.devnull}, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Would install" not in result.stdout, result.stdout


def test_setup_installs_the_lock_with_hashes_and_the_tools_within_its_pins():
    setup = (ROOT / "tools/setup.sh").read_text()
    assert "pip_install --require-hashes -r requirements.txt" in setup
    assert "pip_install -c .venv/runtime-pins.txt -r requirements-dev.txt" in setup
    dev = logical_lines(ROOT / "requirements-dev.txt")
    assert not any(line.startswith(("-r", "--requirement")) and "requirements.txt" in line for line in dev), (
        "requirements-dev.txt must not include the hashed requirements.txt (pip would demand hashes for every tool)"
    )
    assert any(Requirement(line).name == "pip-tools" for line in dev if not line.startswith("-"))
    # Azure's remote build runs `pip install -r requirements.txt`: the package carries the lock, not the .in file.
    deploy = (ROOT / "infra/deploy.sh").read_text()
    assert "PACKAGE_ALLOWLIST=(function_app.py host.json requirements.txt shared)" in deploy
