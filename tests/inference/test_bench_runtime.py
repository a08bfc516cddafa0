"""scripts/benchmarks/bench_runtime.py: its report, without the optional runtimes."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts" / "benchmarks"))

import bench_runtime


def test_a_missing_runtime_is_a_row_that_says_so_not_a_crash():
    assert bench_runtime.optional_module("no_such_runtime_xyz") is None
    row = bench_runtime.unavailable("openvino (ONNX)")
    assert row.run is None and row.note == "not installed"
    failed = bench_runtime.unavailable("onnxruntime", RuntimeError("tf2onnx exit 1: bad op\nmore"))
    assert failed.note == "conversion failed: RuntimeError: tf2onnx exit 1: bad op"


def test_differences_name_every_output_and_the_changed_height_classes():
    reference = {"probabilities": np.zeros((1, 2, 2, 3), np.float32),
                 "height": np.array([[[0, 1], [2, 3]]], np.int32),
                 "defocus_nm": np.array([5.0], np.float32)}
    outputs = {"probabilities": reference["probabilities"] + 1e-6,
               "height": np.array([[[0, 1], [2, 0]]], np.int32)}
    diff = bench_runtime.output_differences(outputs, reference)
    assert diff["probabilities"] == pytest.approx(1e-6, rel=1e-3)
    assert diff["height"] == 3 and diff["height_differs"] == 0.25
    assert np.isnan(diff["defocus_nm"])  # a runtime that loses an output shows
    merged = bench_runtime.merge_max(diff, {"probabilities": 2e-6, "height": 0.0,
                                            "height_differs": 0.0, "defocus_nm": 0.0})
    assert merged["probabilities"] == 2e-6 and merged["height"] == 3
    assert np.isnan(merged["defocus_nm"])


def test_the_table_has_a_column_per_batch_and_output_and_a_line_per_runtime():
    rows = [{"name": "tensorflow", "convert_s": 0.8, "note": "",
             "timing": {1: (0.5, 0.9), 4: (0.4, 0.8)},
             "diff": {"probabilities": 0.0, "height": 0.0, "height_differs": 0.0}},
            {"name": "openvino (ONNX)", "convert_s": float("nan"), "note": "not installed"}]
    text = bench_runtime.format_table(rows, [1, 4], ["probabilities", "height"])
    lines = text.splitlines()
    assert len(lines) == 4
    assert {line.count("|") for line in lines} == {lines[0].count("|")}  # as many cells as the head
    assert "batch 4: CPU ms/frame" in lines[0] and "max abs diff height" in lines[0]
    assert lines[2].startswith("| tensorflow | 0.8 | 500 | 900 | 400 | 800 | 0 | 0 | 0 % |")
    assert "| openvino (ONNX) | not installed |" in lines[3]
