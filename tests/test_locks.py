"""The lock files: every package the gateway and its tests install is pinned with hashes, transitive ones
included, and the locks agree with the hand-edited inputs (scripts/lock writes them from requirements*.in)."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCKS = (ROOT / "requirements.txt", ROOT / "requirements-dev.txt")
INPUTS = (ROOT / "requirements.in", ROOT / "requirements-dev.in")


def locked(path: Path) -> dict[str, tuple[str, list[str], str]]:
    """name -> (version, hashes, environment marker) of every package line in a lock and the locks it includes."""
    found: dict[str, tuple[str, list[str], str]] = {}
    for line in path.read_text().splitlines():
        if line.startswith("-r "):
            found |= locked(path.parent / line[3:].strip())
        elif line and not line.startswith((" ", "#")):
            spec, *options = line.split(" --hash=")
            requirement = Requirement(spec)
            [pin] = requirement.specifier
            assert pin.operator == "==", line
            found[canonicalize_name(requirement.name)] = (pin.version, options, str(requirement.marker or ""))
    return found


def test_every_locked_package_is_pinned_with_hashes() -> None:
    for lock in LOCKS:
        packages = locked(lock)
        assert len(packages) > 30, lock
        for name, (_, hashes, _) in packages.items():
            assert hashes, f"{lock.name}: {name} has no hash"
            assert all(re.fullmatch(r"sha256:[0-9a-f]{64}", h.strip()) for h in hashes), name


def test_the_locks_hold_what_the_inputs_pin() -> None:
    everything = locked(LOCKS[1])
    for source in INPUTS:
        for raw in source.read_text().splitlines():
            line = raw.split("#")[0].strip()
            if not line or line.startswith("-"):
                continue
            requirement = Requirement(line)
            [pin] = requirement.specifier
            name = canonicalize_name(requirement.name)
            assert name in everything, f"{source.name}: {name} is not locked: run scripts/lock"
            assert everything[name][0] == pin.version, f"{source.name}: {name} differs from the lock: run scripts/lock"


def test_the_locks_are_closed_under_dependencies() -> None:
    """Every dependency of a locked package (as installed here, for this Python) is locked too."""
    everything = locked(LOCKS[1])
    environment: dict[str, str] = {k: str(v) for k, v in default_environment().items()}
    missing: list[str] = []
    for name, (version, _, marker) in everything.items():
        if marker and not Requirement(f"x; {marker}").marker.evaluate(environment):  # type: ignore[union-attr]
            continue
        installed = metadata.version(name)
        assert installed == version, f"{name} {installed} is installed, the lock says {version}: run scripts/setup"
        for text in metadata.requires(name) or []:
            dependency = Requirement(text)
            if dependency.marker and not dependency.marker.evaluate({**environment, "extra": ""}):
                continue
            if canonicalize_name(dependency.name) not in everything:
                missing.append(f"{name} needs {dependency}")
    assert missing == []


def test_the_image_and_the_setup_install_with_hashes_required() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^RUN \S+/bin/python -m pip install --require-hashes -r ", dockerfile, re.MULTILINE)
    assert "COPY requirements.txt" in dockerfile
    setup = (ROOT / "scripts" / "setup").read_text()
    assert re.search(r"pip install .*--require-hashes -r requirements-dev\.txt", setup)
    assert "cat requirements.txt requirements-dev.txt | sha256sum" in setup, "setup re-installs when a lock changes"
