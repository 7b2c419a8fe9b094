"""The ``sparsestore`` command, through ``main([...])`` and once as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio
import scipy.sparse as sp

import sparsestore
from sparsestore.cli import main, parse_size
from sparsestore.plot import store_profile


@pytest.fixture
def shards(tmp_path):
    mats = []
    for i in range(3):
        X = sp.random(400, 60, density=0.05, format="csr", dtype=np.float32,
                      random_state=np.random.default_rng(i))
        sp.save_npz(tmp_path / f"part{i}.npz", X)
        mats.append(X)
    return tmp_path, sp.vstack(mats, format="csr")


def test_convert_info_validate_bench(shards, capsys):
    root, X = shards
    dst = root / "out.zarr"
    rc = main(["convert", str(root / "part0.npz"), str(root / "part1.npz"),
               str(root / "part2.npz"), str(dst), "--workers", "2", "--quiet",
               "--chunk-bytes", "8KiB", "--compressor", "zstd"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "1200 x 60" in out
    store = sparsestore.open(dst)
    assert (store[:] != X).nnz == 0
    assert store.layout.compressor == "zstd" and store.layout.chunk_bytes == 8192

    assert main(["info", str(dst), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["shape"] == [1200, 60] and info["nnz"] == X.nnz
    assert info["density"] == pytest.approx(X.nnz / (1200 * 60))
    assert info["compression_ratio"] > 0

    assert main(["info", str(dst)]) == 0
    text = capsys.readouterr().out
    for word in ("shape:", "nnz:", "density:", "dtype:", "chunks:", "bytes:", "labels:"):
        assert word in text

    rc = main(["validate", str(dst), "--quiet"])
    assert rc == 0
    assert "OK" in capsys.readouterr().out

    assert main(["bench", str(dst), "--batch-size", "128", "--shuffle", "--json",
                 "--quiet"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["rows"] == 1200 and res["nnz"] == X.nnz and res["batches"] == 10
    assert res["rows_per_s"] > 0 and res["peak_rss_bytes"] > 0
    assert main(["bench", str(dst), "--quiet"]) == 0
    assert "rows/s" in capsys.readouterr().out


def test_info_plot_is_a_valid_png_from_streamed_profile(shards, capsys):
    root, X = shards
    dst = root / "o.zarr"
    sparsestore.save(dst, X, chunk_bytes=4096)
    png = root / "plot.png"
    assert main(["info", str(dst), "--plot", str(png), "--quiet"]) == 0
    import matplotlib.image as mpimg

    img = mpimg.imread(png)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the streamed profile against scipy
    lengths, counts = store_profile(sparsestore.open(dst), grid=16)
    row_nnz = np.diff(X.indptr)
    np.testing.assert_array_equal(lengths[: row_nnz.max() + 1], np.bincount(row_nnz))
    rr, cc = X.nonzero()
    expected = np.zeros((16, 16), dtype=np.int64)
    np.add.at(expected, (rr * 16 // 1200, cc * 16 // 60), 1)
    np.testing.assert_array_equal(counts, expected)


def test_dense_store_info_and_profile(tmp_path, capsys):
    A = np.zeros((30, 8), dtype=np.float32)
    A[::3, 1] = 2
    sparsestore.save(tmp_path / "d.zarr", A, sparse=False)
    lengths, counts = store_profile(sparsestore.open(tmp_path / "d.zarr"), grid=4)
    assert lengths[1] == 10 and lengths[0] == 20 and counts.sum() == 10
    assert main(["info", str(tmp_path / "d.zarr"), "--plot", str(tmp_path / "d.png"),
                 "-q"]) == 0
    assert (tmp_path / "d.png").stat().st_size > 0


def test_convert_formats_and_labels_from_the_command_line(tmp_path, capsys):
    X = sp.random(50, 20, density=0.2, format="coo", random_state=np.random.default_rng(1))
    sio.mmwrite(tmp_path / "m.mtx", X)
    assert main(["convert", str(tmp_path / "m.mtx"), str(tmp_path / "m.zarr"), "-q"]) == 0
    assert (sparsestore.open(tmp_path / "m.zarr")[:] != X.tocsr()).nnz == 0
    (tmp_path / "d.txt").write_text("1 1:2.5\n0 3:1\n")
    rc = main(["convert", str(tmp_path / "d.txt"), str(tmp_path / "s.zarr"), "--from",
               "libsvm", "--n-features", "4", "--zero-based", "no", "-q"])
    assert rc == 0
    s = sparsestore.open(tmp_path / "s.zarr")
    np.testing.assert_array_equal(s[:].toarray(), [[2.5, 0, 0, 0], [0, 0, 1, 0]])
    np.testing.assert_array_equal(s.labels["y"][:], [1, 0])
    # copy a store keeping one label, with --labels
    sparsestore.save(tmp_path / "l.zarr", X, labels={"y": np.arange(50), "z": np.ones(50)})
    rc = main(["convert", str(tmp_path / "l.zarr"), str(tmp_path / "l2.zarr"), "--labels",
               "y", "-q", "--dtype", "float64"])
    assert rc == 0
    assert list(sparsestore.open(tmp_path / "l2.zarr").labels) == ["y"]


@pytest.mark.parametrize("argv_tail,match", [
    (["info", "{root}/missing.zarr"], "no store at"),
    (["convert", "{root}/missing.npz", "{root}/o.zarr"], "no such file"),
    (["convert", "{root}/x.csv", "{root}/o.zarr"], "cannot tell the format"),
    (["convert", "{root}/bad.npz", "{root}/o.zarr"], "bad.npz"),
    (["convert", "{root}/part0.npz", "{root}/o.zarr", "--from", "parquet"], "unknown format"),
    (["convert", "{root}/part0.npz", "{root}/exists.zarr"],
     "exists.zarr already exists; pass --overwrite to replace it"),
    (["bench", "{root}/part0.npz"], "is a file"),
    (["validate", "{root}/missing.zarr"], "no"),
])
def test_errors_are_one_line_and_nonzero(shards, capsys, argv_tail, match):
    root, _ = shards
    (root / "x.csv").write_text("1,2\n")
    (root / "bad.npz").write_bytes(b"PK\x03\x04 truncated")
    (root / "exists.zarr").mkdir(exist_ok=True)
    argv = [a.format(root=root) for a in argv_tail]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sparsestore: error: "), err
    assert match in lines[0]
    assert "Traceback" not in err
    assert not (root / "o.zarr").exists()
    assert not [p for p in os.listdir(root) if p.startswith(".o.zarr.")]


def test_validate_reports_a_damaged_store(shards, capsys):
    root, X = shards
    dst = root / "v.zarr"
    sparsestore.save(dst, X, chunk_bytes=4096)
    chunk = next(p for p in sorted((dst / "data").rglob("*")) if p.is_file()
                 and p.name != "zarr.json")
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    rc = main(["validate", str(dst), "-q"])
    out = capsys.readouterr()
    assert rc == 1
    assert "FAILED" in out.err


def test_usage_errors_exit_2():
    with pytest.raises(SystemExit) as info:
        main(["convert"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


def test_parse_size():
    assert parse_size("4MiB") == 4 * 2**20
    assert parse_size("512k") == 512 * 1024
    assert parse_size("1048576") == 2**20
    import argparse

    with pytest.raises(argparse.ArgumentTypeError):
        parse_size("lots")


def test_console_script_subprocess(shards):
    root, X = shards
    exe = Path(sys.executable).with_name("sparsestore")
    if not exe.exists():
        pytest.skip("console script not installed (pip install -e .)")
    dst = root / "cli.zarr"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([str(exe), "convert", str(root / "part*.npz"), str(dst)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "1200 x 60" in r.stdout
    assert "\r" not in r.stderr  # stderr is not a terminal: no progress bar
    assert (sparsestore.open(dst)[:] != X).nnz == 0
    png = root / "cli.png"
    r = subprocess.run([str(exe), "info", str(dst), "--plot", str(png)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    import matplotlib.image as mpimg

    assert mpimg.imread(png).shape[2] in (3, 4)
    r = subprocess.run([str(exe), "convert", str(root / "nope.npz"), str(root / "x.zarr")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1
    assert r.stderr.startswith("sparsestore: error: ") and "Traceback" not in r.stderr


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sparsestore: error: "), err
    return lines[0]


@pytest.mark.parametrize("name", ["out.zarr", "plot.xyz", "PLOT.Zarr"])
def test_info_plot_to_an_unknown_picture_format_is_one_line(shards, capsys, monkeypatch, name):
    root, X = shards
    dst = root / "p.zarr"
    sparsestore.save(dst, X)

    def no_profile(*args, **kwargs):
        raise AssertionError("the store was streamed before the plot path was checked")

    monkeypatch.setattr(sparsestore.plot, "store_profile", no_profile)
    assert main(["info", str(dst), "--plot", str(root / name), "--quiet"]) == 1
    line = _one_error_line(capsys)
    assert "picture format" in line and ".png" in line and ".svg" in line
    assert name in line
    assert not (root / name).exists()


def test_info_plot_to_an_unwritable_path_is_one_line(shards, capsys):
    root, X = shards
    dst = root / "p.zarr"
    sparsestore.save(dst, X)
    assert main(["info", str(dst), "--plot", str(root / "nodir" / "p.png"), "-q"]) == 1
    assert "nodir" in _one_error_line(capsys)


def test_info_plot_without_matplotlib_names_the_extra(shards, capsys, monkeypatch):
    root, X = shards
    dst = root / "p.zarr"
    sparsestore.save(dst, X)
    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, mod, None)  # import matplotlib now fails
    assert main(["info", str(dst), "--plot", str(root / "p.png"), "--quiet"]) == 1
    line = _one_error_line(capsys)
    assert "matplotlib" in line and "pip install 'sparsestore[plot]'" in line
    assert not (root / "p.png").exists()


def test_python_dash_m_runs_the_command(shards):
    root, X = shards
    dst = root / "m.zarr"
    sparsestore.save(dst, X)
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, "-m", "sparsestore", "info", str(dst), "--json"],
                       capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["shape"] == [1200, 60]
    r = subprocess.run([sys.executable, "-m", "sparsestore", "info", str(root / "none.zarr")],
                       capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert r.returncode == 1
    assert r.stderr.startswith("sparsestore: error: ") and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "sparsestore", "--version"],
                       capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("sparsestore ")
