"""Move the tested dependency set forward: ``make upgrade``.

``constraints.txt`` pins every package ``make test`` last passed with, so a fresh machine gets the
set we tested instead of whatever the registry serves that day. This script is the one way to move
it: it installs the newest versions ``pyproject.toml``'s ranges allow into a scratch virtualenv,
runs the whole check there (lint, types and the test suite, exactly as ``make test``), and writes
the new pins only when that passes. On failure ``constraints.txt`` is left as it was and the
scratch environment stays behind for a look (``.venv-upgrade``).

    python tools/refresh_constraints.py            # what ``make upgrade`` runs
    python tools/refresh_constraints.py --keep     # keep .venv-upgrade after a success too

``--minimum`` checks the other end of the ranges (``make test-min``): every ``>=`` bound in
``pyproject.toml`` installed exactly, and the test suite run against it (no lint: older ruff
formats differently). It writes nothing; a failure means a lower bound is a claim we do not keep.
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import re
import shutil
import subprocess
import sys

import tomllib  # Python 3.11+, as the interpreter that builds the venvs

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "constraints.txt"
EXTRAS = ".[torch,rl,ray,wandb,mlflow,dev]"
HEADER = """\
# The exact set `make test` last passed with (written by `make upgrade`, {date}, Python {python}).
# `make demo`, `make test` and .ci/run install with `-c constraints.txt`; pyproject.toml keeps
# the ranges for people who install miniray into an environment of their own.
"""


def run(command: list[str], **kwargs) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=ROOT, **kwargs)


def pins(python: pathlib.Path) -> list[str]:
    """``pip freeze`` of the scratch environment, without miniray itself; torch without its
    local build label (``+cpu``), which pyproject.toml's pin and every build satisfy."""
    out = subprocess.run(
        [str(python), "-m", "pip", "freeze", "--exclude-editable"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    lines = []
    for line in out.splitlines():
        if not line or line.startswith("#") or line.lower().startswith("miniray"):
            continue
        name, _, version = line.partition("==")
        lines.append(f"{name}=={version.split('+')[0]}")
    return sorted(lines, key=str.lower)


def lower_bounds(pyproject: pathlib.Path = ROOT / "pyproject.toml") -> list[str]:
    """``name==low`` for every requirement with a ``>=low`` bound in the base dependencies and
    the extras ``make test`` installs; exact pins (``==``) are kept as they are."""
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in re.findall(r"\w+", EXTRAS.split("[")[1]):
        requirements += project["optional-dependencies"][extra]
    out = {}
    for requirement in requirements:
        name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)
        if name == "miniray":
            continue  # an extra naming another extra of ours
        low = re.search(r"(>=|==)\s*([^,;\s]+)", requirement)
        if low:
            out[name.lower()] = f"{name}=={low.group(2)}"
    return sorted(out.values())


def check_minimum(venv: pathlib.Path, pytest_args: list[str]) -> int:
    """Install the lower bounds exactly and run the tests there."""
    python = str(venv / "bin" / "python")
    pinned = venv / "constraints-min.txt"
    run([python, "-m", "pip", "install", "--quiet", "--upgrade", "pip"])
    pinned.write_text("\n".join(lower_bounds()) + "\n")
    print(pinned.read_text(), end="")
    # Not quiet: when a bound cannot be installed, pip's explanation is the useful output.
    run([python, "-m", "pip", "install", "-c", str(pinned), "-e", EXTRAS])
    try:
        run([python, "-m", "pytest", "-q", "-rs", *pytest_args])
    except subprocess.CalledProcessError:
        print("refresh_constraints: the suite fails at the lower bounds", file=sys.stderr)
        return 1
    print("refresh_constraints: the lower bounds pass")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--venv", default=".venv-upgrade", help="scratch virtualenv (default %(default)s)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch virtualenv")
    parser.add_argument(
        "--minimum", action="store_true", help="test pyproject.toml's lower bounds instead"
    )
    parser.add_argument("pytest_args", nargs="*", help="with --minimum: what pytest runs")
    args = parser.parse_args(argv)
    venv = ROOT / (".venv-min" if args.minimum and args.venv == ".venv-upgrade" else args.venv)
    shutil.rmtree(venv, ignore_errors=True)
    run([sys.executable, "-m", "venv", str(venv)])
    if args.minimum:
        return check_minimum(venv, args.pytest_args)
    python = venv / "bin" / "python"
    run([str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"])
    # No -c: the newest versions the ranges allow.
    run([str(python), "-m", "pip", "install", "--quiet", "--upgrade", "-e", EXTRAS])
    candidate = pins(python)
    try:
        run(["make", "test", f"VENV={args.venv}", "SKIP_INSTALL=1"])
    except subprocess.CalledProcessError:
        print(
            f"refresh_constraints: the suite failed with the newest versions; {CONSTRAINTS.name} "
            f"is unchanged. The candidate set is in {venv} (pip freeze there).",
            file=sys.stderr,
        )
        return 1
    old = set(CONSTRAINTS.read_text().splitlines()) if CONSTRAINTS.exists() else set()
    header = HEADER.format(date=datetime.date.today(), python=sys.version.split()[0])
    CONSTRAINTS.write_text(header + "\n".join(candidate) + "\n")
    for line in candidate:
        if line not in old:
            print("  now", line)
    if not args.keep:
        shutil.rmtree(venv)
    print(f"refresh_constraints: {CONSTRAINTS.name} written ({len(candidate)} pins)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
