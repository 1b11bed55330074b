"""Write the lock files from the hand-edited inputs (run through scripts/lock).

requirements.in -> requirements.txt: every runtime package, transitive ones included, pinned with the hashes
of all its files on PyPI (any platform), resolved for every Python the project supports (`--universal`).
requirements-dev.in -> requirements-dev.txt: `-r requirements.txt` plus the packages only development needs,
resolved with requirements.txt as constraints so both files agree on every shared package.

One package per line (`name==version --hash=... --hash=...`), so each line of a lock names its pin; pip
installs them with `--require-hashes`, refusing any file whose hash is not listed. Arguments (`--upgrade`,
`--upgrade-package NAME`) go to `uv pip compile`; without them, versions already locked are kept.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNTIME_IN, RUNTIME_LOCK = ROOT / "requirements.in", ROOT / "requirements.txt"
DEV_IN, DEV_LOCK = ROOT / "requirements-dev.in", ROOT / "requirements-dev.txt"
PYTHON_FLOOR = "3.11"  # pyproject.toml requires-python
COMMAND = "scripts/lock"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==")


def compile_lock(source: Path, output: Path, extra: list[str]) -> None:
    """`uv pip compile` with hashes; `output`'s existing pins are kept unless `extra` asks for upgrades."""
    argv = [
        str(Path(sys.executable).parent / "uv"),
        "pip",
        "compile",
        "--quiet",
        "--generate-hashes",
        "--universal",
        "--python-version",
        PYTHON_FLOOR,
        "--custom-compile-command",
        COMMAND,
        "--output-file",
        str(output),
        str(source),
        *extra,
    ]
    subprocess.run(argv, cwd=ROOT, check=True)


def one_line_per_package(text: str) -> list[str]:
    """Join uv's backslash-continued hash lines, so that each package is one line."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        lines.append((pending + line.strip()) if pending else line)
        pending = ""
    return lines


def package_name(line: str) -> str | None:
    match = PIN.match(line)
    return match[1].lower().replace("_", "-").replace(".", "-") if match else None


def without_packages(lines: list[str], names: set[str]) -> list[str]:
    """`lines` minus the entries of `names` and the `# via` comments that follow each of them."""
    kept: list[str] = []
    dropping = False
    for line in lines:
        name = package_name(line)
        if name is not None:
            dropping = name in names
        elif not line.startswith("    #"):
            dropping = False
        if not dropping:
            kept.append(line)
    return kept


def main(extra: list[str]) -> None:
    compile_lock(RUNTIME_IN, RUNTIME_LOCK, extra)
    runtime = one_line_per_package(RUNTIME_LOCK.read_text())
    RUNTIME_LOCK.write_text("\n".join(runtime) + "\n")
    runtime_names = {name for line in runtime if (name := package_name(line))}

    with tempfile.TemporaryDirectory() as tmp:
        # Seed the output with both locks so that uv keeps the dev-only pins too.
        full = Path(tmp) / "requirements-dev.txt"
        previous = DEV_LOCK.read_text().splitlines() if DEV_LOCK.exists() else []
        full.write_text("\n".join([*runtime, *(ln for ln in previous if ln.strip() != "-r requirements.txt")]) + "\n")
        compile_lock(DEV_IN, full, extra)
        dev = without_packages(one_line_per_package(full.read_text()), runtime_names)
    header_end = next(i for i, ln in enumerate(dev) if ln and not ln.startswith("#"))
    body = dev[header_end:]
    DEV_LOCK.write_text("\n".join([*dev[:header_end], "-r requirements.txt", *body]) + "\n")
    print(f"wrote {RUNTIME_LOCK.name} ({len(runtime_names)} packages) and {DEV_LOCK.name}")


if __name__ == "__main__":
    main(sys.argv[1:])
