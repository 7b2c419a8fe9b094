"""Turn the suite's results into ``results.md`` (tables, targets, machine) and two PNG charts;
:func:`regenerate` rebuilds every generated page of a results folder (and README.md's
targets table) from the json files alone."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from .common import MiB
from .records import table

TARGETS_DOC = {
    "read": "full read of the store >= 5x faster than load_npz of the compressed npz",
    "tf_slices": "to SparseTensor from disk (sequential) >= 1.2x "
                 "from_tensor_slices(SparseTensor).batch in memory",
    "tf_gen": "... >= 2.5x a from_generator building COO from scipy in memory",
    "keras": "Keras epoch streaming from disk <= 1.1x the same batches cached in memory",
    "shuffle": "shuffled / sequential throughput >= 0.8",
    "rss": "peak RSS growth streaming a 4x larger matrix within 10% of the smaller",
    "convert": "convert of the .npz shards: 2 workers >= 1.6x faster than 1",
    "dask_scipy": "dask column sums from disk >= 0.5x scipy in memory",
    "dask_anndata": "dask column sums >= 3x anndata's lazy dask path",
}


def ok(r: dict[str, Any] | None) -> bool:
    return bool(r) and r.get("status") == "ok" and r.get("seconds", 0) > 0


def mnnz_s(r: dict[str, Any]) -> float:
    return r["nnz"] / r["seconds"] / 1e6


def rows_s(r: dict[str, Any]) -> float:
    return r["rows"] / r["seconds"]


def _f(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}f}"


def _status_note(r: dict[str, Any]) -> str:
    if r.get("status") != "ok":
        return f"**{r.get('status')}**: {r.get('reason', '')}"
    frac = r.get("fraction")
    if frac is not None and frac < 0.999:
        return f"partial: {100 * frac:.0f}% of an epoch in the time budget"
    return ""


def _speed(r: dict[str, Any]) -> list[str]:
    """The M nnz/s and rows/s cells."""
    return [_f(mnnz_s(r)), _f(rows_s(r), 0)] if ok(r) else ["-", "-"]


def _rss(r: dict[str, Any], isolated: bool) -> tuple[str, str]:
    if not ok(r):
        return "-", "-"
    return _f(r["rss_growth_mib"], 0), (_f(abs_peak(r), 0) if isolated else "-")


def abs_peak(r: dict[str, Any]) -> float:
    """Peak RSS sampled during the case (imports included).  Not ru_maxrss: Linux carries the
    parent's peak into a forked child, so that figure is the suite's, not the case's."""
    return r["rss_start_mib"] + r["rss_growth_mib"]


def best_baseline(results: dict[str, dict[str, Any]], group: str = "stream") -> dict | None:
    cands = [r for r in results.values() if r["group"] == group and r["baseline"] and ok(r)]
    return max(cands, key=mnnz_s) if cands else None


def _ratio(a: dict | None, b: dict | None, fn: Any = mnnz_s) -> float | None:
    if not ok(a) or not ok(b):
        return None
    return fn(a) / fn(b)


def _load(folder: Path | None, name: str) -> dict[str, Any] | None:
    """``NAME.json`` of ``folder`` (another benchmark's interleaved figures), if there."""
    p = None if folder is None else Path(folder) / f"{name}.json"
    return json.loads(p.read_text()) if p is not None and p.is_file() else None


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _interleaved(folder: Path | None) -> dict[str, Any]:
    """The steadier figures the other benchmarks record (medians of interleaved rounds)."""
    got: dict[str, Any] = {}
    recs = {name: doc["records"] for name in ("tf_compare", "shuffle", "shuffle_pass", "memory")
            if (doc := _load(folder, name))}
    if "tf_compare" in recs:  # the sequential stream's ratios per matrix
        got["tf"] = {r["matrix"]: r for r in recs["tf_compare"]
                     if r["group"] == "ratios" and r["stream"] == "seq"}
    if "shuffle" in recs:
        rate = {(r["store"], r["config"]): r["rows/s"] for r in recs["shuffle"]}
        got["shuffle"] = {s: rate[s, "shuffle (default)"] / rate[s, c] for s, c in rate
                          if c == "sequential" and (s, "shuffle (default)") in rate}
    if "shuffle_pass" in recs:
        # "singlecell (100k x 20k, ...), default layout" -> "singlecell, default layout"
        got["shuffle_steady"] = {(re.sub(r" \(.*?\)", "", r["store"]), r["consumer"]):
                                 r["vs_sequential"] for r in recs["shuffle_pass"]
                                 if r["mode"] == "default shuffle"}
    if "memory" in recs:  # the TF stream's peaks per pass, by rows
        got["memory"] = {r["rows"]: r["peak growth MiB"] for r in recs["memory"]
                         if r["group"] == "peak RSS growth per pass" and r["mode"] == "tf"}
    return got


def targets(results: dict[str, dict[str, Any]], folder: Path | None = None
            ) -> list[list[str]]:
    """``[target, suite (one pass), interleaved, verdict]`` rows for the issues' acceptance
    numbers.  The verdict reads the interleaved figure where one is recorded (the steadier
    one on a shared machine), else the suite's."""
    g = results.get
    more = _interleaved(folder)
    rows: list[list[str]] = []

    def add(key: str, suite: float | None, good: bool | None = None, inter: str = "-",
            least: float | None = None) -> None:
        """A target's row (``key`` of TARGETS_DOC, else the target's own words); with
        ``least``, met when ``suite`` reaches it."""
        if least is not None and suite is not None:
            good = suite >= least
        verdict = "n/a" if good is None else ("met" if good else "NOT met")
        rows.append([TARGETS_DOC.get(key, key), _x(suite), inter, verdict])

    add("read", _ratio(g("read_store_default"), g("read_npz")), least=5)
    v = _ratio(g("ss_tf_seq"), g("tf_from_tensor_slices"))
    tf = more.get("tf")
    if tf:
        inter = "; ".join(f"{k}: eager {_x(t['eager loop'])}, in-graph {_x(t['in-graph'])}, "
                          f"Keras epoch {_x(t['Keras epoch'])}" for k, t in tf.items())
        add("tf_slices", v, next(iter(tf.values()))["in-graph"] >= 1.2, "tf_compare " + inter)
    else:
        add("tf_slices", v, least=1.2)
    add("tf_gen", _ratio(g("ss_tf_seq"), g("tf_from_generator")), least=2.5)
    k = g("keras_fit")
    v = k["stream_over_cached"] if ok(k) else None
    add("keras", v, None if v is None else v <= 1.1)
    v = _ratio(g("ss_tf_shuffled"), g("ss_tf_seq"))
    sh = more.get("shuffle")
    steady = more.get("shuffle_steady")
    if sh:
        text = "shuffle, default / sequential rows/s, a first pass: " + ", ".join(
            f"{s} {_x(x)}" for s, x in sh.items())
        good = min(sh.values()) >= 0.8
        if steady:  # training's throughput: epochs after the first (the verdict's)
            text += "; shuffle_pass, epochs 2-4: " + ", ".join(
                f"{s} {c} {_x(x)}" for (s, c), x in steady.items())
            # the target is the default layout's; other layouts are shown beside it
            good = min(x for (st, _), x in steady.items() if "default" in st) >= 0.8
        add("shuffle", v, good, text)
    else:
        add("shuffle", v, least=0.8)
    if ok(k):
        add("... same in Keras fit (sequential / shuffled epoch time)",
            k["shuffled_over_sequential_throughput"], least=0.8)
    scal = sorted((r for r in results.values() if r["group"] == "scaling" and ok(r)
                   and not r["name"].startswith("scaling_loader")), key=lambda r: r["rows"])
    mem = more.get("memory")
    for i, (a, b) in enumerate(zip(scal, scal[1:], strict=False)):
        grow = b["rss_growth_mib"] / max(a["rss_growth_mib"], 1e-9) - 1
        inter = "-"
        if mem and i == len(scal) - 2:
            inter = "memory, TF stream over passes: " + ", ".join(
                f"{n:,} rows {min(p):.0f}-{max(p):.0f} MiB" for n, p in mem.items())
        rows.append([TARGETS_DOC["rss"] + f" ({a['name']} -> {b['name']})",
                     f"{100 * grow:+.0f}% ({a['rss_growth_mib']:.0f} -> "
                     f"{b['rss_growth_mib']:.0f} MiB)", inter,
                     "met" if grow <= 0.10 else "NOT met"])
    if not scal:
        add("rss", None)
    add("convert", _ratio(g("convert_w2"), g("convert_w1")), least=1.6)
    c = g("convert_w2")
    if ok(c) and c.get("shard_max_bytes"):
        rows.append(["convert peak RSS growth vs one shard decompressed",
                     f"{c['rss_growth_mib'] * MiB / c['shard_max_bytes']:.1f}x "
                     f"({c['rss_growth_mib']:.0f} MiB vs {c['shard_max_bytes'] / MiB:.1f} MiB)",
                     "-", "info"])
    add("dask_scipy", _ratio(g("dask_colsum_store"), g("dask_colsum_scipy"), rows_s), least=0.5)
    v = _ratio(g("dask_colsum_store"), g("dask_colsum_scipy_load"), rows_s)
    if v is not None:
        add("... dask column sums vs scipy load_npz + sum (same disk)", v, least=0.5)
    add("dask_anndata", _ratio(g("dask_colsum_store"), g("dask_colsum_anndata"), rows_s),
        least=3)
    return rows


TARGETS_HEADER = ["target", "suite (one pass each)", "interleaved (other benchmarks' json)",
                  "verdict"]


def targets_table(doc: dict[str, Any], folder: Path | None) -> list[str]:
    return _table(TARGETS_HEADER, targets(as_run(doc)["results"], folder))


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    return table([dict(zip(header, row, strict=True)) for row in body])


def as_run(doc: dict[str, Any]) -> dict[str, Any]:
    """A ``results.json`` document as the suite's run: meta, and the records by case name."""
    return {**doc["meta"], "results": {r["name"]: r for r in doc["records"]}}


def markdown(doc: dict[str, Any], folder: Path | None = None) -> str:
    """The whole ``results.md``, from ``results.json``'s document; the targets table also
    reads the interleaved figures of the other json files in ``folder``."""
    run = as_run(doc)
    results: dict[str, dict[str, Any]] = run["results"]
    m, size, iso = run["machine"], run["size"], run["isolated"]
    lines = [
        "# sparsestore benchmarks",
        "",
        "Generated from `results.json` (and the targets' interleaved figures from the other "
        "json files here) by `python -m benchmarks report`.",
        "",
        f"Command: `{run['command']}`  ",
        f"Date: {run['date']} (suite wall time {run['wall_s']:.0f} s)  ",
        f"Size `{size['name']}`: {size['n_rows']:,} x {size['n_cols']:,} float32, "
        f"~{size['nnz_per_row']} nnz/row ({run['meta'].get('nnz', 0):,} nnz), "
        f"batch size {run['batch_size']}; slow baselines cut after {size['time_budget']:.0f} s "
        f"(then reported as partial).  ",
        f"Machine: {m['cpu']}, {m['cores']} usable cores, {m['ram_gib']} GiB RAM, {m['os']}, "
        f"Python {m['python']}, commit {m['commit'] or '?'}; load average at start "
        f"{m['load_avg']}, at end {run.get('load_avg_end')}.  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".",
        "",
        ("Each case ran in a fresh subprocess; `RSS growth` is the peak RSS sampled every 5 ms "
         "during the case (data loading included) minus the RSS after its library imports; "
         "`process peak` is the peak RSS sampled during the case in its subprocess, library "
         "imports included."
         if iso else
         "All cases ran in one process (`--no-isolate`, the default for `--tiny`); `RSS growth` "
         "is approximate there (memory freed by earlier cases is reused)."),
        "Files were just written, so reads come from the page cache (warm): the numbers are "
        "CPU cost of decoding and conversion, not disk speed.",
        "",
    ]
    if run.get("noisy"):
        lines += [f"**Noise warning**: {run['noisy']}", ""]

    # -- streaming
    best = best_baseline(results)
    lines += ["## Streaming into TensorFlow (same matrix, batch 1024, one pass)", ""]
    if best is not None:
        lines += [f"Best baseline: **{best['label']}** ({mnnz_s(best):.2f} M nnz/s).", ""]
    body = []
    stream = [r for r in results.values() if r["group"] == "stream"]
    stream.sort(key=lambda r: (not r["ours"], r["baseline"] is False and not r["ours"]))
    for r in stream:
        g, p = _rss(r, iso)
        vs = _ratio(r, best) if best is not None else None
        body.append([r["label"], *_speed(r), g, p, "-" if vs is None else f"{vs:.2f}x",
                     _status_note(r)])
    lines += _table(["case", "M nnz/s", "rows/s", "RSS growth MiB", "process peak MiB",
                     "vs best baseline", "note"], body)
    z, zs = results.get("raw_zarr"), results.get("raw_zarrs")
    sq = results.get("ss_tf_seq")
    if ok(z) and ok(sq):
        lines += [f"sparsestore -> TF sequential reaches {mnnz_s(sq) / mnnz_s(z):.0%} of the raw "
                  "zarr decode ceiling (default codec pipeline)."]
    if ok(z) and ok(zs):
        lines += [f"zarrs codec pipeline vs default on local disk: raw decode "
                  f"{mnnz_s(zs) / mnnz_s(z):.2f}x"
                  + (f", loader {_ratio(results.get('ss_loader_seq_zarrs'), results.get('ss_loader_seq')):.2f}x"  # noqa: E501
                     if ok(results.get("ss_loader_seq_zarrs")) and ok(results.get("ss_loader_seq"))
                     else "") + "."]
    lines += [""]

    # -- io
    lines += ["## Write, size and full read vs scipy .npz", ""]
    wn, rn = results.get("write_npz"), results.get("read_npz")
    body = []
    for r in results.values():
        if r["group"] != "io":
            continue
        ref = wn if r["name"].startswith("write") else rn
        disk = r.get("disk_bytes")
        body.append([r["label"], _f(mnnz_s(r)) if ok(r) else "-",
                     _f(r["seconds"], 3) if ok(r) else "-",
                     _f(disk / MiB, 1) if disk else "-",
                     f"{disk / wn['disk_bytes']:.2f}x" if disk and ok(wn) else "-",
                     "-" if _ratio(r, ref) is None else f"{_ratio(r, ref):.2f}x",
                     _rss(r, iso)[0], _status_note(r)])
    lines += _table(["case", "M nnz/s", "seconds", "disk MiB", "size vs npz",
                     "speed vs npz", "RSS growth MiB", "note"], body)

    # -- keras
    k = results.get("keras_fit")
    lines += ["## Keras model.fit epoch time", ""]
    if k:
        lines += [f"{k['label']}: {k['description']}.", ""]
    if ok(k):
        lines += _table(
            ["variant", "epoch s (median)", "rows/s", "vs cached"],
            [["streamed from disk (sequential)", _f(k["seconds"], 3), _f(rows_s(k), 0),
              f"{k['stream_over_cached']:.2f}x"],
             ["same batches, ds.cache() in memory", _f(k["cached_seconds"], 3),
              _f(k["rows"] / k["cached_seconds"], 0), "1.00x"],
             ["streamed from disk (shuffled)", _f(k["shuffled_seconds"], 3),
              _f(k["rows"] / k["shuffled_seconds"], 0),
              f"{k['shuffled_seconds'] / k['cached_seconds']:.2f}x"]])
    else:
        lines += [_status_note(k) if k else "not run", ""]

    # -- convert, dask
    for group, title in (("convert", "Convert .npz shards"), ("dask", "Dask column sums")):
        rs = [r for r in results.values() if r["group"] == group]
        if not rs:
            continue
        lines += [f"## {title}", ""]
        body = [[r["label"], *_speed(r), _f(r["seconds"], 3) if ok(r) else "-", *_rss(r, iso),
                 _status_note(r)] for r in rs]
        lines += _table(["case", "M nnz/s", "rows/s", "seconds", "RSS growth MiB",
                         "process peak MiB", "note"], body)

    # -- scaling
    rs = sorted((r for r in results.values() if r["group"] == "scaling"),
                key=lambda r: (r["name"].startswith("scaling_loader"), r.get("store_rows", 0)))
    if rs:
        lines += ["## Scaling: the same streaming pass at x1, x4, x16 rows", "",
                  "The RSS target compares the `to tf.data` rows; the DataLoader-only rows show "
                  "how much of the memory is the loader's own working set.", ""]
        body = [[r["label"], f"{r.get('store_rows', 0):,}", f"{r.get('store_nnz', 0):,}",
                 *_speed(r), *_rss(r, iso), _status_note(r)] for r in rs]
        lines += _table(["case", "rows", "nnz", "M nnz/s", "rows/s", "RSS growth MiB",
                         "process peak MiB", "note"], body)

    # -- targets
    lines += ["## Targets from the issues", ""]
    lines += ["Verdicts read the interleaved figure where another benchmark records one (steadier "
              "on a shared machine: `python -m benchmarks tf_compare`, `shuffle`, `memory`), "
              "else the suite's single pass (for TensorFlow, an eager Python loop).", ""]
    lines += targets_table(doc, folder)
    if run.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in run["notes"]] + [""]
    lines += ["## What each case does", ""]
    lines += [f"- `{r['name']}`: {r['description']}" for r in results.values()]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ plots


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def throughput_png(run: dict[str, Any], path: Path) -> None:
    """Horizontal bars: M nnz/s (log) and RSS growth of every streaming case that ran."""
    plt = _plt()
    rs = [r for r in run["results"].values() if r["group"] == "stream" and ok(r)]
    rs.sort(key=mnnz_s)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 0.45 * max(4, len(rs)) + 1.5),
                                   sharey=True, gridspec_kw={"width_ratios": [3, 1]})
    colors = ["tab:blue" if r["ours"] else ("tab:gray" if r["baseline"] else "tab:green")
              for r in rs]
    y = range(len(rs))
    vals = [mnnz_s(r) for r in rs]
    ax1.barh(y, vals, color=colors)
    ax1.set_xscale("log")
    for i, v in enumerate(vals):
        ax1.text(v, i, f" {v:.2f}", va="center", fontsize=8)
    ax1.set_yticks(list(y), [r["label"] for r in rs], fontsize=8)
    ax1.set_xlabel("M nnz/s (log scale; blue: sparsestore, gray: baselines, green: ceiling)")
    ax2.barh(y, [r["rss_growth_mib"] for r in rs], color=colors)
    ax2.set_xlabel("peak RSS growth (MiB)")
    s = run["size"]
    fig.suptitle(f"Streaming {s['n_rows']:,} x {s['n_cols']:,} (~{s['nnz_per_row']} nnz/row), "
                 f"batch {run['batch_size']} -- {run['machine']['cpu']}, "
                 f"{run['machine']['cores']} cores", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def scaling_png(run: dict[str, Any], path: Path) -> None:
    """Throughput and peak RSS growth of the streaming pass against matrix rows."""
    plt = _plt()
    every = sorted((r for r in run["results"].values() if r["group"] == "scaling" and ok(r)),
                   key=lambda r: r["store_rows"])
    rs = [r for r in every if not r["name"].startswith("scaling_loader")]
    ld = [r for r in every if r["name"].startswith("scaling_loader")]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    xs = [r["store_rows"] for r in rs]
    ax1.plot(xs, [mnnz_s(r) for r in rs], "o-", label="to tf.data")
    if ld:
        ax1.plot([r["store_rows"] for r in ld], [mnnz_s(r) for r in ld], "^:",
                 label="DataLoader only")
        ax2.plot([r["store_rows"] for r in ld], [r["rss_growth_mib"] for r in ld], "^:",
                 label="RSS growth, DataLoader only")
    ax1.legend(fontsize=8)
    ax1.set_xscale("log")
    ax1.set_xlabel("rows")
    ax1.set_ylabel("M nnz/s")
    ax1.set_ylim(bottom=0)
    ax1.set_title("throughput")
    ax2.plot(xs, [r["rss_growth_mib"] for r in rs], "o-", label="RSS growth, to tf.data")
    if run["isolated"]:
        ax2.plot(xs, [abs_peak(r) for r in rs], "s--", label="process peak RSS, to tf.data")
    ax2.set_xscale("log")
    ax2.set_xlabel("rows")
    ax2.set_ylabel("MiB")
    ax2.set_ylim(bottom=0)
    ax2.set_title("memory")
    ax2.legend(fontsize=8)
    fig.suptitle("sparsestore sequential pass: x1, x4, x16 rows", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------ regenerate

README_BEGIN = ("<!-- targets: generated by `python -m benchmarks report` from "
                "benchmarks/results -->")
README_END = "<!-- /targets -->"


def page(path: Path) -> str | None:
    """The markdown page generated from ``path`` (a results json), or None if it has none."""
    import importlib

    from . import records

    doc = json.loads(path.read_text())
    if not records.is_records(doc):
        return None
    if doc["benchmark"] == "results":
        return markdown(doc, path.parent)
    module = records.RENDERERS.get(doc["benchmark"], "records")
    return getattr(importlib.import_module(f"benchmarks.{module}"), "markdown",
                   records.to_markdown)(doc)


def regenerate(argv: list[str] | None = None) -> int:
    """``python -m benchmarks report``: every ``.md`` with a ``.json`` beside it, rebuilt from
    the json, and README.md's targets table from ``results.json``."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m benchmarks report",
                                 description=regenerate.__doc__)
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--readme", type=Path, default=Path(__file__).parent.parent / "README.md",
                    help="README whose targets table is rewritten ('' : none)")
    args = ap.parse_args(argv)
    for path in sorted(args.results.glob("*.json")):
        md = page(path)
        if md is None:
            print(f"{path.name}: no page")
            continue
        target = path.with_suffix(".md")
        changed = not target.exists() or target.read_text() != md
        target.write_text(md)
        print(f"{target.name}: {'rewritten' if changed else 'unchanged'}")
    res = args.results / "results.json"
    if str(args.readme) and args.readme.is_file() and res.is_file():
        text = args.readme.read_text()
        if README_BEGIN in text and README_END in text:
            head, rest = text.split(README_BEGIN, 1)
            _, tail = rest.split(README_END, 1)
            body = targets_table(json.loads(res.read_text()), args.results)
            new = head + README_BEGIN + "\n\n" + "\n".join(body) + README_END + tail
            if new != text:
                args.readme.write_text(new)
            print(f"{args.readme.name}: targets {'rewritten' if new != text else 'unchanged'}")
    return 0
