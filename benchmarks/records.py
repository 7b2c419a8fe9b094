"""The one result schema: ``NAME.json`` holds flat rows and the run's facts; ``NAME.md`` is
generated from it (never written by hand), so ``python -m benchmarks report`` can rebuild
every table from the json alone.

``NAME.json``::

    {"benchmark": NAME,
     "meta": {"command": ..., "commit": ..., "machine": {...}, "date": ..., ...},
     "records": [{"group": ..., "case": ..., <figure>: <number>, ...}, ...]}

A record is one flat dict (values are numbers, strings, booleans or lists of them); records
with the same ``group`` form one table, its columns the keys in order of first appearance.
``meta`` may name a ``title``, a ``note`` (before the tables), a ``footer`` (after them) and
``formats``: column -> format spec of its numbers (else :func:`fmt`'s).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .common import dump_json, machine_info


def run_meta(command: str | None = None, **extra: Any) -> dict[str, Any]:
    """The facts every record file carries: command, commit, machine, date (plus ``extra``)."""
    machine = machine_info()
    argv = " ".join(sys.argv)  # the benchmarks runner sets argv[0] to its own command
    return {"command": command or (argv if argv.startswith("python -m ") else
                                   "python -m " + argv),
            "commit": machine.pop("commit"), "machine": machine,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), **extra}


def write_records(name: str, records: Iterable[dict[str, Any]], meta: dict[str, Any],
                  out_dir: str | Path, markdown: Callable[[dict[str, Any]], str] | None = None,
                  echo: bool = True) -> dict[str, Any]:
    """Write ``NAME.json`` and ``NAME.md`` (from the json, by ``markdown`` or :func:`to_markdown`)
    into ``out_dir``; print the markdown and return the document."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "meta": meta, "records": list(records)}
    dump_json(doc, out / f"{name}.json")
    doc = json.loads((out / f"{name}.json").read_text())  # the md sees exactly the json
    md = (markdown or to_markdown)(doc)
    (out / f"{name}.md").write_text(md)
    if echo:
        print(md)
    return doc


def is_records(doc: Any) -> bool:
    return isinstance(doc, dict) and {"benchmark", "meta", "records"} <= set(doc)


def fmt(x: Any, spec: str | None = None) -> str:
    """A table cell: thousands separators, 3 significant decimals for small floats (a number
    by ``spec``, e.g. ``"{:.2f}"``, where given)."""
    if spec and isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x):
        return spec.format(x)
    if isinstance(x, bool) or x is None:
        return "-" if x is None else ("yes" if x else "no")
    if isinstance(x, float):
        if not math.isfinite(x):
            return "-"
        return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3g}" if abs(x) < 10 else f"{x:.1f}"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, list):
        return " ".join(fmt(v, spec) for v in x)
    return str(x)


def table(rows: list[dict[str, Any]], skip: tuple[str, ...] = ("group",),
          formats: dict[str, str] | None = None) -> list[str]:
    formats = formats or {}
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols and k not in skip]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(fmt(r.get(c), formats.get(c)) for c in cols) + " |" for r in rows]
    return out + [""]


def header(doc: dict[str, Any], title: str | None = None) -> list[str]:
    m = doc["meta"]
    mach = m.get("machine", {})
    where = (f"{mach.get('cpu', '?')}, {mach.get('cores', '?')} usable cores"
             if isinstance(mach, dict) else str(mach))
    lines = [f"# {title or doc['benchmark']}", "",
             f"Generated from `{doc['benchmark']}.json` by `python -m benchmarks report`; "
             f"made by `{m.get('command', '?')}` on {m.get('date', '?')}, commit "
             f"{m.get('commit') or '?'}, {where}.", ""]
    if m.get("note"):
        lines += [m["note"], ""]
    return lines


def to_markdown(doc: dict[str, Any]) -> str:
    """The generic page: a header from ``meta``, then one table per ``group``."""
    lines = header(doc, doc["meta"].get("title"))
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in doc["records"]:
        groups.setdefault(str(r.get("group", "")), []).append(r)
    for g, rows in groups.items():
        if g:
            lines += [f"## {g}", ""]
        lines += table(rows, formats=doc["meta"].get("formats"))
    if doc["meta"].get("footer"):
        lines += [doc["meta"]["footer"], ""]
    return "\n".join(lines)


# benchmark name -> module (under benchmarks) whose ``markdown(doc)`` renders its page;
# the others get :func:`to_markdown`
RENDERERS: dict[str, str] = {"multiworker": "bench_multiworker"}
