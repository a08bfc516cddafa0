"""The served model on other runtimes: TensorFlow, ONNX Runtime and OpenVINO on the same frames.

    python scripts/benchmarks/bench_runtime.py                                  # the shipped model
    python scripts/benchmarks/bench_runtime.py --model saved_models/ceria110/4 \
        --model saved_models/ceria110/6 --repeats 5 --threads 2
    # version 4 left the tree: git checkout ceria110-v4 -- saved_models/ceria110/4 first

For each served version folder (TF Serving layout, ``saved_models/NAME/VERSION``) and runtime:

- ``tensorflow``: the SavedModel's ``serving_default`` signature, called as
  :class:`ceriakeras.inference.served.ServedModel` calls it (the reference);
- ``onnxruntime``: an ONNX conversion of that same signature by tf2onnx's command
  (``python -m tf2onnx.convert --saved-model``; ``keras.Model.export(format="onnx")`` also goes
  through tf2onnx on the TensorFlow backend, so the Keras model need not be rebuilt), run by an
  ONNX Runtime CPU session;
- ``openvino (SavedModel)`` and ``openvino (ONNX)``: ``openvino.convert_model`` on the SavedModel
  folder and on the ONNX file, compiled for the CPU at float32 (``INFERENCE_PRECISION_HINT``) with
  the latency hint.

It prints the conversion time (for TensorFlow: loading the SavedModel), the wall ms and the process
CPU ms (all threads) per 512² model frame at batch 1 and 4 (median of ``--repeats`` after one
warm-up call), and the largest absolute difference of every output of the signature against
TensorFlow's on the same frames (for ``height``: also the share of pixels whose class differs).
Then the column table of the first frame (:func:`ceriakeras.inference.predict.frame_columns`, the
model's own threshold) from each runtime's probabilities against TensorFlow's. A runtime that is
not installed is reported as such. On a machine that others share the wall times vary with their
load; the process CPU time per frame is the fairer figure (the load is printed). Results on the
2-core development machine: docs/scaling.md, "Other runtimes: ONNX Runtime and OpenVINO".

The frames are synthetic: :func:`bench_analyze.lattice_frame`'s Poisson counts of a CeO2 [110]
Ce lattice at the model's pixel size (``--dose``, e⁻/Å², default 2000 as bench_analyze's), so
the column tables are not empty.

The optional runtimes live in a separate environment that sees the project's (nothing of the
project's own environment changes)::

    python -m venv .rt-venv          # the same Python as .venv (3.11)
    .venv/bin/python -c "import site; print(site.getsitepackages()[0])" \
        > .rt-venv/lib/python3.11/site-packages/mainvenv.pth
    .rt-venv/bin/pip install onnxruntime openvino onnx
    .rt-venv/bin/pip install --no-deps tf2onnx
    PYTHONPATH=. .rt-venv/bin/python scripts/benchmarks/bench_runtime.py ...

(onnx 1.23.2, onnxruntime 1.32.0, openvino 2026.4.1, tf2onnx 1.17.0 with TensorFlow 2.21,
Keras 3.15, NumPy 2.4.6: nothing of .venv was downgraded; tf2onnx's own dependencies, numpy,
onnx, requests, flatbuffers and protobuf, were already there.)
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ceriakeras.cli.startup import quiet_libraries  # noqa: E402

quiet_libraries()  # TensorFlow's, absl's and CUDA's start-up lines off the terminal, as in the CLI

import numpy as np
from bench_analyze import lattice_frame
from bench_model import median_seconds

OPSET = 17
"""ONNX opset of the conversion (tf2onnx's default for TensorFlow 2.x graphs)."""


@dataclass
class Runtime:
    """A runtime ready to run a model, or why it is not.

    Attributes
    ----------
    name : str
        ``tensorflow``, ``onnxruntime``, ``openvino (SavedModel)``, …
    run : callable or None
        ``run(x (B, H, W, 1) float32) -> {output name: array}``; None if unavailable.
    convert_s : float
        Seconds to convert and load it (for TensorFlow: to load the SavedModel).
    note : str
        Why it is unavailable (``not installed``, ``conversion failed: …``), else "".
    """

    name: str
    run: Callable | None = None
    convert_s: float = float("nan")
    note: str = ""


def optional_module(name: str):
    """The module ``name`` if it can be imported, else None (an optional runtime)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def unavailable(name: str, error: BaseException | None = None) -> Runtime:
    """A runtime row that says why it did not run: not installed, or the error's first line."""
    if error is None:
        return Runtime(name, note="not installed")
    first = (str(error).strip().splitlines() or [""])[0][:160]
    return Runtime(name, note=f"conversion failed: {type(error).__name__}: {first}")


def tensorflow_runtime(version: Path, threads: int) -> tuple[Runtime, object]:
    """The SavedModel's signature, as :mod:`ceriakeras.inference.served` loads and calls it; also
    returns the :class:`ServedModel` (its ``info`` and signature)."""
    import tensorflow as tf

    from ceriakeras.inference.served import load_served_model

    start = time.perf_counter()
    served = load_served_model(version)
    convert_s = time.perf_counter() - start

    def run(x):
        return {k: np.asarray(v) for k, v in served.signature(image=tf.constant(x)).items()}

    return Runtime("tensorflow", run, convert_s), served


def onnx_file(version: Path, out: Path) -> tuple[Path, float]:
    """Convert the SavedModel's ``serving_default`` to ONNX with tf2onnx's command (a separate
    process, its start and TensorFlow's import included); the file and the seconds it took.

    Raises
    ------
    RuntimeError
        If tf2onnx fails (its last line says why).
    """
    command = [sys.executable, "-m", "tf2onnx.convert", "--saved-model", str(version),
               "--tag", "serve", "--signature_def", "serving_default", "--opset", str(OPSET),
               "--output", str(out)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not out.is_file():
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise RuntimeError(f"tf2onnx exit {done.returncode}: {last}")
    return out, time.perf_counter() - start


def onnxruntime_runtime(path: Path, convert_s: float, threads: int) -> Runtime:
    """An ONNX Runtime CPU session on ``path`` with ``threads`` intra-op threads that do not
    spin while idle (on shared cores spinning only burns CPU time: 0.49 s against 0.41 s of CPU
    per 512² frame of version 4 here, wall time no better)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # shared cores
    start = time.perf_counter()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    convert_s += time.perf_counter() - start
    names = [o.name for o in session.get_outputs()]
    image = session.get_inputs()[0].name

    def run(x):
        return dict(zip(names, session.run(names, {image: x})))

    return Runtime("onnxruntime", run, convert_s)


def openvino_runtime(source: Path, label: str, threads: int, output_names) -> Runtime:
    """``openvino.convert_model(source)`` compiled for the CPU at float32 with ``threads``
    inference threads; its outputs named as the signature's (``output_names``)."""
    import openvino as ov

    start = time.perf_counter()
    compiled = ov.Core().compile_model(ov.convert_model(str(source)), "CPU", {
        "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32",
        "PERFORMANCE_HINT": "LATENCY"})
    convert_s = time.perf_counter() - start
    names = []
    for port in compiled.outputs:  # a tensor has several names; keep the signature's
        known = sorted(set(port.get_names()) & set(output_names))
        names.append(known[0] if known else port.get_any_name())
    request = compiled.create_infer_request()

    def run(x):
        result = request.infer({0: x})
        return {name: np.asarray(result[port]) for name, port in zip(names, compiled.outputs)}

    return Runtime(f"openvino ({label})", run, convert_s)


def other_runtimes(served, work: Path, threads: int, output_names) -> list[Runtime]:
    """ONNX Runtime and OpenVINO for a served model; rows that say why for those that fail."""
    runtimes, path, convert_s = [], None, float("nan")
    if optional_module("tf2onnx") is None or optional_module("onnx") is None:
        runtimes.append(unavailable("onnxruntime"))
    else:
        try:
            path, convert_s = onnx_file(served.path, work / f"{served.path.name}.onnx")
            runtimes.append(onnxruntime_runtime(path, convert_s, threads)
                            if optional_module("onnxruntime") else unavailable("onnxruntime"))
        except Exception as error:  # noqa: BLE001  (reported in the table, not hidden)
            runtimes.append(unavailable("onnxruntime", error))
    for label, source in (("SavedModel", served.path), ("ONNX", path)):
        name = f"openvino ({label})"
        if optional_module("openvino") is None or source is None:
            runtimes.append(unavailable(name))
            continue
        try:
            runtime = openvino_runtime(source, label, threads, output_names)
            if label == "ONNX":
                runtime.convert_s += convert_s
            runtimes.append(runtime)
        except Exception as error:  # noqa: BLE001  (reported in the table, not hidden)
            runtimes.append(unavailable(name, error))
    return runtimes


def synthetic_frames(batch: int, size: int, pixel_A: float, dose_e_per_A2: float,
                     seed: int = 0) -> np.ndarray:
    """(batch, size, size, 1) float32 Poisson counts of a CeO2 [110] lattice at ``pixel_A`` Å."""
    rng = np.random.default_rng(seed)
    frames = [lattice_frame(size, pixel_A, dose_e_per_A2, rng) for _ in range(batch)]
    return np.stack(frames).astype(np.float32)[..., None]


def output_differences(outputs: dict, reference: dict) -> dict[str, float]:
    """Largest absolute difference of each reference output; ``height`` also as the share of
    pixels whose class differs (key ``height_differs``). Missing outputs give NaN."""
    diff = {}
    for name, ref in reference.items():
        if name not in outputs or np.shape(outputs[name]) != np.shape(ref):
            diff[name] = float("nan")
            continue
        a, b = np.asarray(outputs[name], np.float64), np.asarray(ref, np.float64)
        diff[name] = float(np.max(np.abs(a - b))) if a.size else 0.0
        if name == "height":
            diff["height_differs"] = float(np.mean(a != b))
    return diff


def merge_max(a: dict, b: dict) -> dict:
    """Per key the larger of two difference dicts; NaN (a missing output) wins."""
    merged = {}
    for key in {**a, **b}:
        values = [d[key] for d in (a, b) if key in d]
        merged[key] = float("nan") if np.isnan(values).any() else float(max(values))
    return merged


def column_table_text(probabilities: np.ndarray, reference: np.ndarray, info: dict,
                      frame: np.ndarray) -> str:
    """How the column table of one frame from ``probabilities`` compares with ``reference``'s:
    number of columns, heights that differ, largest position shift (px)."""
    from ceriakeras.inference.predict import ColumnSettings, frame_columns
    from ceriakeras.noise import estimate_dose

    settings = ColumnSettings.for_model(info)
    dose = estimate_dose(frame, settings.model_pixel_A, 1.0)
    ours = frame_columns(probabilities, 1.0, settings, dose_e_per_A2=dose)
    theirs = frame_columns(reference, 1.0, settings, dose_e_per_A2=dose)
    n, m = len(ours["x_px"]), len(theirs["x_px"])
    if n != m:
        return f"{n} columns against TensorFlow's {m}"
    if n == 0:
        return "no columns in either"
    shift = np.hypot(ours["x_px"] - theirs["x_px"], ours["y_px"] - theirs["y_px"]).max()
    heights = int(np.sum(ours["height"] != theirs["height"]))
    confidence = float(np.max(np.abs(ours["confidence"] - theirs["confidence"])))
    return (f"same {n} columns; {heights} heights differ; largest shift {shift:.2g} px; "
            f"largest confidence difference {confidence:.2g}")


def format_table(rows: list[dict], batches, output_names) -> str:
    """A Markdown table: one row per runtime (``name``, ``convert_s``, ``timing`` {batch: (wall
    s, CPU s) per frame}, ``diff`` {output: max |Δ|}, ``note``)."""
    head = ["runtime", "convert s"]
    for b in batches:
        head += [f"batch {b}: wall ms/frame", f"batch {b}: CPU ms/frame"]
    head += [f"max abs diff {name}" for name in output_names] + ["height class differs"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in rows:
        if row.get("note"):
            lines.append(f"| {row['name']} | {row['note']} |" + " |" * (len(head) - 2))
            continue
        cells = [row["name"], f"{row['convert_s']:.1f}"]
        for b in batches:
            wall, cpu = row["timing"][b]
            cells += [f"{wall * 1000:.0f}", f"{cpu * 1000:.0f}"]
        diff = row.get("diff", {})
        cells += [f"{diff.get(name, float('nan')):.2g}" for name in output_names]
        share = diff.get("height_differs", float("nan"))
        cells.append(f"{100 * share:.3g} %")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bench_version(path, args) -> None:
    """Time and compare every runtime on one served version folder; print its table."""
    from ceriakeras.inference.served import find_version

    version = find_version(path)
    reference_runtime, served = tensorflow_runtime(version, args.threads)
    output_names = sorted(served.signature.structured_outputs)
    output_names = ["probabilities"] + [n for n in output_names if n != "probabilities"]
    pixel_A = float(served.info["pixel_size_A"])
    inputs = {b: synthetic_frames(b, args.size, pixel_A, args.dose, seed=b) for b in args.batches}
    reference = {b: reference_runtime.run(x) for b, x in inputs.items()}
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        runtimes = [reference_runtime] + other_runtimes(served, Path(work), args.threads,
                                                        output_names)
        rows, columns = [], []
        for runtime in runtimes:
            row = {"name": runtime.name, "convert_s": runtime.convert_s, "note": runtime.note}
            rows.append(row)
            if runtime.run is None:
                continue
            row["timing"] = {b: tuple(s / b for s in median_seconds(
                lambda x=x, run=runtime.run: run(x), args.repeats)) for b, x in inputs.items()}
            outputs = {b: runtime.run(x) for b, x in inputs.items()}
            diff = {}
            for b in args.batches:
                diff = merge_max(diff, output_differences(outputs[b], reference[b]))
            row["diff"] = diff
            first = args.batches[0]
            columns.append(f"  {runtime.name}: " + column_table_text(
                outputs[first]["probabilities"][0], reference[first]["probabilities"][0],
                served.info, inputs[first][0, ..., 0]))
            print(f"  {runtime.name} done", file=sys.stderr, flush=True)
    print(f"\n{version}: {args.size}² frames at {pixel_A} Å, {args.threads} threads, median of "
          f"{args.repeats}, load {os.getloadavg()[0]:.1f}\n", flush=True)
    print(format_table(rows, args.batches, output_names))
    print("\ncolumn table of the first frame against TensorFlow's:\n" + "\n".join(columns),
          flush=True)


def set_tensorflow_threads(threads: int) -> None:
    """TensorFlow on ``threads`` intra-op threads and one inter-op thread, as ``analyze`` sets a
    single worker (:mod:`ceriakeras.analysis.threads`); before TensorFlow starts."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)


def versions_text() -> str:
    """The versions of the runtimes, or "not installed"."""
    parts = []
    for name in ("tensorflow", "onnxruntime", "openvino", "onnx", "tf2onnx"):
        module = optional_module(name)
        parts.append(f"{name} {getattr(module, '__version__', '?') if module else 'not installed'}")
    return ", ".join(parts)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], metavar="DIR",
                        help="served model: saved_models/NAME or a version folder (repeatable; "
                             "default the shipped model)")
    parser.add_argument("--size", type=int, default=512, metavar="PX",
                        help="frame side at the model's pixel size, px")
    parser.add_argument("--batches", default="1,4", help="batch sizes, comma separated")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls after one warm-up")
    parser.add_argument("--threads", type=int, default=2,
                        help="threads of every runtime (intra-op)")
    parser.add_argument("--dose", type=float, default=2000.0, metavar="E_PER_A2",
                        help="dose of the synthetic frames, e⁻/Å²")
    parser.add_argument("--work", default=None, metavar="DIR",
                        help="folder for the temporary ONNX files (default: the system's)")
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    set_tensorflow_threads(args.threads)
    print(versions_text(), flush=True)
    if not args.model:
        from ceriakeras.inference.served import default_model_path

        args.model = [default_model_path()]
    for path in args.model:
        bench_version(path, args)


if __name__ == "__main__":
    main()
