"""The benchmark script runs end to end (tiny shape, CPU) and writes the JSON the GPU runs are compared with."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench.py")


@pytest.mark.slow
def test_benchmark_runs_and_writes_json(tmp_path, capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench", bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    assert bench.main(["--device", "cpu", "--shapes", "tiny", "--no-compile", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.iterdir()
    data = json.loads(path.read_text())
    assert {"gpu", "torch", "triton", "copy_bandwidth_bytes_per_ms"} <= set(data)
    rows = {(r["op"], r["pass_"]) for r in data["results"]}
    assert rows == {
        ("indices_to_multihot", "fwd"),
        ("permute", "fwd"),
        ("permute", "bwd"),
        ("unpermute", "fwd"),
        ("unpermute", "bwd"),
        ("init_routing_v2 int8", "fwd"),
    }
    assert all(r["ours_ms"] > 0 and r["floor_ms"] > 0 and r["eager_ms"] > 0 for r in data["results"])
    assert "ratio" in capsys.readouterr().out


@pytest.mark.slow
def test_gmm_benchmark_runs_and_writes_json(tmp_path, capsys, monkeypatch):
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gmm.py")
    spec = importlib.util.spec_from_file_location("gmm_bench", path)
    gmm_bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gmm_bench", gmm_bench)
    spec.loader.exec_module(gmm_bench)
    assert gmm_bench.main(["--device", "cpu", "--cases", "tiny", "--dtypes", "float32", "--out", str(tmp_path)]) == 0
    data = json.loads(next(tmp_path.iterdir()).read_text())
    assert [(r["case"], r["pass_"]) for r in data["results"]] == [("tiny", "fwd"), ("tiny", "bwd")]
    assert all(r["ours_ms"] > 0 and r["loop_tflops"] > 0 for r in data["results"])
    assert "vs loop" in capsys.readouterr().out


@pytest.mark.slow
def test_host_benchmark_runs_and_writes_json(tmp_path):
    import subprocess

    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "host.py")
    cmd = [sys.executable, script, "--shape", "tiny", "--device", "cpu", "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300).stdout
    data = json.loads((tmp_path / "host-cpu.json").read_text())
    assert [r["op"] for r in data["results"]][:2] == ["indices_to_multihot", "permute"]
    assert all(r["dispatcher_us"] > 0 and r["fast_us"] > 0 for r in data["results"])
    assert "saved us" in out
