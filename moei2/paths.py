"""The locations of one compression run (input model, output checkpoint, work dir, report), checked
against one another before any work: a run must never destroy its own input or state."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

ROLES = ("model", "output", "work_dir", "report")


def _resolved(path) -> Optional[Path]:
    return None if path is None else Path(os.fspath(path)).expanduser().resolve()


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_run_paths(model=None, output=None, work_dir=None, report=None, *, names=ROLES) -> None:
    """Refuses locations that collide: the output and the model directory inside one another (the
    output replaces its directory when the run ends); the work dir or the report inside the output
    (deleted by that replacement) or inside the model directory; the report at the work dir.
    ``names``: how the four are called in messages (the CLI passes its option names). ValueError
    naming the later of the two."""
    m, o, w, r = (_resolved(p) for p in (model, output, work_dir, report))
    label = {role: f"{n} {os.fspath(p)!r}" for role, n, p in zip(ROLES, names, (model, output, work_dir, report))
             if p is not None}
    where = dict(zip(ROLES, names))

    if m is not None and o is not None:
        if _within(o, m):
            raise ValueError(f"{where['output']}: the output is, or is inside, the input {label['model']}")
        if _within(m, o):
            raise ValueError(f"{where['output']}: the output contains the input {label['model']}; replacing it "
                             "would delete the input")
    for role, path in (("work_dir", w), ("report", r)):
        if path is None:
            continue
        if o is not None and _within(path, o):
            raise ValueError(f"{where[role]}: {label[role]} is inside the output {label['output']}, which the run "
                             "replaces at its end: it would be deleted")
        if m is not None and _within(path, m):
            raise ValueError(f"{where[role]}: {label[role]} is inside the input {label['model']}")
    if r is not None and w is not None and r == w:
        raise ValueError(f"{where['report']}: {label['report']} is the work dir")
