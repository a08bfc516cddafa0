"""The arithmetic cost of a network per frame, counted from its layers.

A model is chosen for its accuracy *and* its cost on the CPUs that run it (issue 23: version 6
costs 23.1 GFLOP per 512² model frame, version 4 7.0). :func:`forward_flops` walks a functional
model's graph for a given frame size and counts 2 FLOP per multiply-add of every convolution,
transposed convolution and dense layer: the work that dominates the run time. Biases,
normalization, activations, pooling and merges are left out (a few per cent of the total;
``scripts/benchmarks/bench_model.py`` compares the count with TensorFlow's profiler, which
counts them too).
"""

from __future__ import annotations

import math

import keras

from .model import CropTo, PadToMultiple


def _conv_output_px(size: int, kernel: int, stride: int, dilation: int, padding: str) -> int:
    if padding == "same":
        return math.ceil(size / stride)
    return (size - (kernel - 1) * dilation - 1) // stride + 1


def _spatial_out(layer, inputs: list) -> tuple[int, int] | None:
    """The (H, W) of ``layer``'s output from those of its inputs (None: not a spatial tensor)."""
    hw = inputs[0]
    if isinstance(layer, (keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D,
                          keras.layers.Dense)) or hw is None:
        return None
    if isinstance(layer, PadToMultiple):
        m = layer.multiple
        return (-(-hw[0] // m) * m, -(-hw[1] // m) * m)
    if isinstance(layer, CropTo):
        return inputs[1]
    if isinstance(layer, keras.layers.Conv2DTranspose):
        return (hw[0] * layer.strides[0], hw[1] * layer.strides[1])
    if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)):
        return tuple(_conv_output_px(n, layer.kernel_size[i], layer.strides[i],
                                     layer.dilation_rate[i], layer.padding)
                     for i, n in enumerate(hw))
    if isinstance(layer, (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D)):
        return tuple(_conv_output_px(n, layer.pool_size[i], layer.strides[i], 1, layer.padding)
                     for i, n in enumerate(hw))
    return hw


def _layer_multiply_adds(layer, in_hw, out_hw, in_channels: int) -> int:
    """Multiply-adds of one call of ``layer`` on one frame (0 for layers not counted)."""
    if isinstance(layer, keras.layers.Conv2DTranspose):
        kh, kw = layer.kernel_size
        return in_hw[0] * in_hw[1] * kh * kw * in_channels * layer.filters
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        kh, kw = layer.kernel_size
        return out_hw[0] * out_hw[1] * kh * kw * in_channels * layer.depth_multiplier
    if isinstance(layer, keras.layers.Conv2D):
        kh, kw = layer.kernel_size
        return out_hw[0] * out_hw[1] * kh * kw * (in_channels // layer.groups) * layer.filters
    if isinstance(layer, keras.layers.Dense):
        return in_channels * layer.units
    return 0


def forward_flops(model: keras.Model, height_px: int = 512, width_px: int = 512) -> dict:
    """FLOP of one forward pass of ``model`` on one frame, counted from its layers.

    Parameters
    ----------
    model : keras.Model
        A functional model from :func:`ceriakeras.nn.model.build_model` (input ``(B, H, W, 1)``).
    height_px, width_px : int
        Frame size at the model's pixel size, px (512 × 512: a 1024² frame at 0.1 Å).

    Returns
    -------
    dict
        ``flops`` (2 per multiply-add of the convolutions, transposed convolutions and dense
        layers; per frame), ``by_resolution`` ``{input px per output px: flops}`` (where
        the work happens: 1 = the model's pixel size, 2 = half of it, …, 0 = the dense layers
        of the global branch) and ``layers``
        ``[(layer name, flops), …]`` in graph order.
    """
    if height_px < 1 or width_px < 1:
        raise ValueError(f"frame size {height_px} × {width_px} px must be positive")
    spatial = {id(t): (height_px, width_px) for t in model.inputs}
    total, layers, by_resolution = 0, [], {}
    for layer in model.layers:
        for node in layer._inbound_nodes:
            inputs = [spatial.get(id(t)) for t in node.input_tensors] or [(height_px, width_px)]
            out_hw = _spatial_out(layer, inputs)
            channels = node.input_tensors[0].shape[-1] if node.input_tensors else 1
            macs = _layer_multiply_adds(layer, inputs[0], out_hw, int(channels or 1))
            if macs:
                total += 2 * macs
                layers.append((layer.name, 2 * macs))
                grid = out_hw or inputs[0]
                scale = round(height_px / grid[0]) if grid else 0  # 0: per frame (dense)
                by_resolution[scale] = by_resolution.get(scale, 0) + 2 * macs
            for t in node.output_tensors:
                spatial[id(t)] = out_hw
    return {"flops": total, "by_resolution": dict(sorted(by_resolution.items())),
            "layers": layers}
