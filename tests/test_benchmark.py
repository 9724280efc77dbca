"""The benchmark stage and the measuring primitives: the table's columns and that its numbers
are measured (a half-width model has a quarter of the parameters and about a quarter of the
file size; zeroed weights show up in non-zero counts and gzip size, not in raw size)."""

from __future__ import annotations

import dataclasses
import gzip
import json
import shutil
import time

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from compress import measure
from compress.config import load_pipeline
from compress.context import Context
from compress.engine import cache
from compress.errors import ConfigError
from compress.measure import evaluate
from compress.models import build_model, load_model, save_model
from compress.results import ResultsTable, columns, predictions_beside
from compress.stages import config_registry
from compress.stages import export as export_stage
from compress.stages.benchmark import BenchmarkConfig
from compress.stages.benchmark import run as run_benchmark
from compress.variants import Variant
from tests.conftest import TINY_PIPELINE, write_pipeline

SPEC = {"arch": "lenet5", "in_channels": 1, "image_size": 28, "num_classes": 10}
PROMISED = [
    "variant",
    "runtime",
    "format",
    "parent",
    "stage",
    "accuracy",
    "accuracy_delta_pp",
    "size_bytes",
    "gzip_bytes",
    "size_ratio",
    "gzip_ratio",
    "parameters",
    "nonzero_parameters",
    "sparsity",
    "macs",
    "latency_b1_p50_ms",
    "latency_b1_p95_ms",
    "latency_b16_p50_ms",
    "latency_b16_p95_ms",
    "throughput_b16",
    "latency_ratio_b1",
    "latency_ratio_b16",
    "threads",
    "cpu_model",
    "export_ok",
    "parity_max_abs_diff",
    "parity_top1_agreement",
    "per_class_accuracy",
]


def make_variant(root, name, width, parent=None, zero_fraction=0.0):
    torch.manual_seed(1)
    spec = {**SPEC, "width": width}
    model = build_model(spec)
    if zero_fraction:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:  # zero the smallest weights, as magnitude pruning would
                    cut = p.abs().flatten().kthvalue(int(zero_fraction * p.numel())).values
                    p[p.abs() <= cut] = 0
    path = root / f"{name}.pt"
    save_model(model, spec, path)
    return Variant(name, "torch", path, stage="test", parent=parent, metrics={"test_accuracy": 0.1})


def make_pt2(root, parent):
    """What the quantize stage's PyTorch backend ships: a torch.export program (.pt2)."""
    model, _ = load_model(parent.file)
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model.eval(), (torch.randn(2, 1, 28, 28),), dynamic_shapes=({0: batch},))
    path = root / f"{parent.name}.pt2"
    torch.export.save(program, str(path))
    return Variant(f"{parent.name}.pt2", "pt2", path, stage="quantize", parent=parent.name)


@pytest.fixture(scope="module")
def measured(tmp_path_factory, data_root):
    root = tmp_path_factory.mktemp("bench")
    text = TINY_PIPELINE.replace("limit_test: 1000", "limit_test: 300")
    pipeline = load_pipeline(write_pipeline(root, text), config_registry())
    ctx = Context(pipeline, "test-run", root / "run", torch.device("cpu"), data_root, "test")
    baseline = make_variant(root, "baseline", 1.0)
    half = make_variant(root, "half", 0.5)
    sparse = make_variant(root, "sparse", 1.0, parent="baseline", zero_fraction=0.5)
    program = make_pt2(root, half)
    ctx.variants = {v.name: v for v in (baseline, half, sparse, program)}
    export_cfg = export_stage.ExportConfig.model_validate({"stage": "export", "parity_samples": 32})
    exported = export_stage.run(export_cfg, [baseline, half, program], ctx, root / "export")
    assert "not exported" in exported.metrics["variants"]["half.pt2"]["skipped"]
    ctx.artifacts = exported.artifacts
    cfg = BenchmarkConfig.model_validate(
        {"stage": "benchmark", "batch_sizes": [16, 1], "warmup": 2, "repeats": 5, "min_seconds": 0.05}
    )
    result = run_benchmark(cfg, [baseline, half, sparse, program], ctx, root / "bench")
    table = pd.read_csv(root / "bench" / "results.csv")
    return ctx, result, table, root / "bench"


def row(table, variant, runtime):
    found = table[(table["variant"] == variant) & (table["runtime"] == runtime)]
    assert len(found) == 1, table[["variant", "runtime"]]
    return found.iloc[0]


def test_table_has_the_promised_columns_and_rows(measured):
    _ctx, result, table, out = measured
    assert set(PROMISED) <= set(table.columns)
    assert list(table.columns) == columns([1, 16])
    pairs = list(zip(table["variant"], table["runtime"], strict=True))
    assert pairs == [
        ("baseline", "pytorch"),
        ("baseline", "torchscript"),
        ("baseline", "onnxruntime"),
        ("half", "pytorch"),
        ("half", "torchscript"),
        ("half", "onnxruntime"),
        ("sparse", "pytorch"),  # not exported: it ships in no other runtime
        ("half.pt2", "pytorch"),
    ]
    assert (table["status"] == "ok").all() and (table["threads"] == 1).all()
    records = json.loads((out / "results.json").read_text())
    assert len(records) == 8 and len(records[0]["per_class_accuracy"]) == 10
    assert result.publish == {
        "results.csv": "results.csv",
        "results.json": "results.json",
        "predictions.npz": "predictions.npz",
    }
    assert result.metrics["rows"] == 8 and "half@onnxruntime" in result.metrics


def test_the_table_is_the_stages_declared_output_and_a_cache_hit_hands_it_on(measured, tmp_path):
    _ctx, result, _table, out = measured
    assert result.table == out / "results.json"
    table = ResultsTable.load(result.table)
    assert table.rows == json.loads((out / "results.json").read_text())
    assert table.columns == columns([1, 16])
    kept = predictions_beside(result.table)
    assert kept is not None and set(kept.rows) == {f"{r['variant']}@{r['runtime']}" for r in table.rows}
    # committed to the cache and reused: the table is restored inside the entry, like a variant
    partial, entry = tmp_path / "partial", tmp_path / "benchmark-0123"
    shutil.copytree(out, partial)
    cache.commit(partial, entry, dataclasses.replace(result, table=partial / "results.json"))
    reused = cache.load_cached(entry, "benchmark")
    assert reused is not None and reused.table == entry / "results.json"
    assert ResultsTable.load(reused.table).rows == table.rows and reused.publish == result.publish


def test_half_width_has_a_quarter_of_the_parameters_and_of_the_file(measured):
    _ctx, _result, table, _ = measured
    for runtime in ("pytorch", "torchscript", "onnxruntime"):
        base, half = row(table, "baseline", runtime), row(table, "half", runtime)
        assert base["parameters"] == 431_080  # Caffe LeNet-5 (20-50-500)
        ratio = half["parameters"] / base["parameters"]
        assert 0.22 < ratio < 0.28
        assert half["parameters_ratio"] == pytest.approx(ratio)
        assert half["size_ratio"] == pytest.approx(half["size_bytes"] / base["size_bytes"])
        assert half["size_ratio"] == pytest.approx(ratio, rel=0.1)  # the file is mostly fp32 weights
        assert half["macs_ratio"] < 0.35
        assert base["size_ratio"] == 1.0 and base["accuracy_delta_pp"] == 0.0
        assert base["size_bytes"] > 4 * base["parameters"]  # fp32 weights + a little framing


def test_zeroed_weights_show_in_nonzero_counts_and_gzip_not_raw_size(measured):
    _ctx, _result, table, _ = measured
    base, sparse = row(table, "baseline", "pytorch"), row(table, "sparse", "pytorch")
    assert sparse["parameters"] == base["parameters"]
    assert sparse["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert sparse["nonzero_parameters"] == base["parameters"] - round(sparse["sparsity"] * base["parameters"])
    assert sparse["size_ratio"] == pytest.approx(1.0, abs=0.01)
    assert sparse["gzip_ratio"] < 0.8  # zeros compress
    assert sparse["nonzero_macs"] < 0.6 * sparse["macs"] and sparse["macs"] == base["macs"]


def test_accuracy_and_latency_are_measured(measured):
    ctx, _result, table, _ = measured
    bundle = ctx.data()
    model, _ = load_model(ctx.variants["half"].file)
    expected = evaluate(model, bundle, bundle.test, torch.device("cpu"))
    for runtime in ("pytorch", "torchscript", "onnxruntime"):
        half = row(table, "half", runtime)
        assert half["accuracy"] == pytest.approx(expected["accuracy"])
        assert half["test_count"] == 300 and half["top1_agreement_pytorch"] == 1.0
        base = row(table, "baseline", runtime)
        assert half["accuracy_delta_pp"] == pytest.approx(100 * (half["accuracy"] - base["accuracy"]))
        assert json.loads(half["per_class_accuracy"]) == pytest.approx(expected["per_class_accuracy"])
        for b in (1, 16):
            assert 0 < half[f"latency_b{b}_p50_ms"] <= half[f"latency_b{b}_p95_ms"]
            assert half[f"latency_b{b}_repeats"] >= 5
            assert half[f"throughput_b{b}"] == pytest.approx(b * 1000 / half[f"latency_b{b}_p50_ms"])
            assert half[f"latency_ratio_b{b}"] == pytest.approx(
                half[f"latency_b{b}_p50_ms"] / base[f"latency_b{b}_p50_ms"]
            )
    onnx_row = row(table, "half", "onnxruntime")
    assert bool(onnx_row["export_ok"]) and onnx_row["parity_max_abs_diff"] <= 1e-4
    assert pd.isna(row(table, "half", "pytorch")["export_ok"])


# ---------------------------------------------------------------- measure primitives


def test_macs_match_torch_flop_counter():
    for width in (1.0, 0.5):
        model = build_model({**SPEC, "width": width}).eval()
        x = torch.randn(3, 1, 28, 28)
        counted = measure.count_macs(model, x)
        with FlopCounterMode(display=False) as flops, torch.no_grad():
            model(x)
        assert counted.macs * 2 * 3 == flops.get_total_flops()
    assert measure.count_macs(build_model({**SPEC, "width": 1.0}), x[:1]).macs == 2_293_000


def test_latency_timer_skips_the_first_call_and_repeats_enough():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.2 if len(calls) == 1 else 0.001)

    latency = measure.time_latency(fn, batch=4, warmup=1, repeats=20, min_seconds=0.05)
    assert latency.repeats >= 20 and len(calls) == latency.repeats + 1
    assert latency.p95_ms < 50  # the slow first call was warm-up, not a sample
    assert latency.throughput == pytest.approx(4 / (latency.p50_ms / 1000))
    slow = measure.time_latency(lambda: None, batch=1, warmup=1, repeats=5, min_seconds=0.1)
    assert slow.repeats > 100  # kept going until min_seconds


def test_gzip_size_is_the_gzip_of_the_file(tmp_path):
    path = tmp_path / "x.bin"
    data = np.concatenate([np.zeros(50_000, np.float32), np.random.default_rng(0).random(50_000)]).tobytes()
    path.write_bytes(data)
    assert measure.file_size(path) == len(data)
    assert measure.gzip_size(path) == len(gzip.compress(data, compresslevel=9, mtime=0))


def test_config_errors_name_the_key(tmp_path):
    bad = TINY_PIPELINE + "  - stage: benchmark\n    baseline: nope\n    batch_sizes: [0]\n"
    with pytest.raises(ConfigError) as caught:
        load_pipeline(write_pipeline(tmp_path, bad), config_registry())
    assert "stages[1] (benchmark).batch_sizes" in str(caught.value)
    missing = TINY_PIPELINE + "  - stage: benchmark\n    baseline: nope\n"
    with pytest.raises(ConfigError) as caught:
        load_pipeline(write_pipeline(tmp_path, missing), config_registry())
    assert "stages[1] (benchmark).baseline: variant 'nope'" in str(caught.value)
    assert measure.resolve_threads("all") >= 1


def test_torch_export_programs_run_in_pytorch_with_counts_from_the_parent(measured):
    _ctx, _result, table, _ = measured
    program, half = row(table, "half.pt2", "pytorch"), row(table, "half", "pytorch")
    assert program["format"] == "pt2" and program["counts_from"] == "parent:half"
    assert program["parameters"] == half["parameters"] and program["macs"] == half["macs"]
    assert program["accuracy"] == pytest.approx(half["accuracy"])
    assert program["top1_agreement_pytorch"] == 1.0  # compared with its parent's eager predictions
