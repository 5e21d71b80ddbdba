"""A strict JSON reader for the tests: NaN and Infinity are refused, as jq, browsers and most languages do."""

from __future__ import annotations

import json
from pathlib import Path


def _refuse(name: str):
    raise ValueError(f"{name} is not JSON")


def loads(text: str):
    return json.loads(text, parse_constant=_refuse)


def check_tree(root: str | Path) -> list[str]:
    """Parse every ``*.json`` file and every line of every ``*.jsonl`` file below ``root`` strictly; returns
    their names (relative to ``root``), so a test can also check that the files it expects were read."""
    root = Path(root)
    names = []
    for path in sorted(root.rglob("*.json*")):
        if path.suffix == ".json":
            loads(path.read_text())
        elif path.suffix == ".jsonl":
            for line in path.read_text().splitlines():
                loads(line)
        else:
            continue
        names.append(str(path.relative_to(root)))
    return names
