"""benchmarks/layer.py runs end to end with --smoke (tiny shape, CPU) and writes the JSON the GPU runs are read from."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

LAYER = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "layer.py")


@pytest.mark.slow
def test_layer_benchmark_smoke(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("layer_bench", LAYER)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--smoke", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.iterdir()
    assert path.name == "layer-cpu.json"
    data = json.loads(path.read_text())
    assert {"gpu", "torch", "triton", "results"} <= set(data)
    (row,) = data["results"]
    assert not {k: v for k, v in row.items() if k.endswith("_error")}
    for variant in bench.VARIANTS:
        assert row[f"{variant}_ms"] > 0 and row[f"{variant}_compile_s"] > 0
    assert row["eager_ms"] > 0
    # The layer's routing is rewritten in one graph; stock compile with the capture settings is one graph too.
    assert row["rewrites"] == {
        "multihot_int_scatter": 1,
        "multihot_probs_scatter": 1,
        "permute_masked_select_probs": 1,
        "combine_scatter_add_probs": 1,
    }
    assert row["moe_inductor_graphs"] == 1 and row["stock+capture_graphs"] == 1
    out = capsys.readouterr().out
    assert "compile time moe_inductor / stock" in out.splitlines()[-1]
