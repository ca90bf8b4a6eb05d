"""Adds to each `name==version` pin of a lock file the sha256 of every file PyPI holds for that release.

pip then installs with --require-hashes (any hash in the file turns it on): a file that differs from
what PyPI published, from a mirror or a find-links directory, is refused. Every file's hash is listed,
not only this machine's wheel, so another Python or platform installs the same pins.

    python3 hack/hash-lock.py hack/real-worker.txt   # rewrites the file in place
"""

from __future__ import annotations

import json
import re
import sys
import urllib.request
from pathlib import Path

PIN = re.compile(r"^([A-Za-z0-9._-]+)==([^\s\\]+)")


def hashes(name: str, version: str) -> list[str]:
    # The project's JSON, not the release's: the per-release URL is not served for every release.
    url = f"https://pypi.org/pypi/{name}/json"
    with urllib.request.urlopen(url, timeout=60) as answer:  # noqa: S310 (a fixed https URL)
        project = json.load(answer)
    found = sorted({file["digests"]["sha256"] for file in project["releases"].get(version, [])})
    if not found:
        raise SystemExit(f"PyPI lists no file for {name}=={version}")
    return found


def main(path: Path) -> None:
    lines: list[str] = []
    for line in path.read_text().splitlines():
        if line.startswith("    --hash="):
            continue  # the hashes of an earlier run, made again below
        pin = PIN.match(line)
        if pin is None:
            lines.append(line)
            continue
        name, version = pin.groups()
        lines.append(f"{name}=={version} \\")
        digests = hashes(name, version)
        lines.extend(f"    --hash=sha256:{digest}" + (" \\" if i < len(digests) - 1 else "")
                     for i, digest in enumerate(digests))
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
