"""The U-Net that labels each pixel with the height of the Ce column under it, and its input layers.

The network reads raw detector counts (or any linear intensity) of any size::

    image (B, H, W, 1) counts
      → PoissonNoise            fresh shot noise on expected counts, training only
      → NormalizeIntensity      counts / image mean − 1 (dose- and gain-invariant), or
        NormalizeToVacuum       counts / vacuum level − 1 (also framing-invariant; version 3)
      → PadToMultiple           pad H, W up to a multiple of 2**depth
      → U-Net (depth levels)    conv-norm-relu ×2, max-pool down, transposed conv up, skips
      → CropTo                  back to H × W
      → softmax                 (B, H, W, max_height + 1) float32, class k = k Ce atoms, 0 = none

All custom layers are registered, so a saved ``.keras`` file loads with ``safe_mode=True``.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from ..config import ModelConfig, ModelError
from ..noise import detector_blur, poisson_sample

_PACKAGE = "ceriakeras"


@keras.saving.register_keras_serializable(package=_PACKAGE)
class PoissonNoise(keras.layers.Layer):
    """Replace expected counts by a Poisson draw of them, only when ``training=True``.

    The input holds *expected* electron counts per pixel (noise-free intensity × dose × pixel
    area); each call in training draws new noise (a :class:`keras.random.SeedGenerator` advances
    its state every step), so every epoch sees fresh noise. At inference it is the identity.

    With ``detector_correlation_max > 0`` the counts are then blurred by a detector MTF
    (:func:`ceriakeras.data.pipeline.detector_blur`) whose neighbour-pixel noise correlation is
    drawn per image uniformly in ``[0, detector_correlation_max]``, so the network also sees the
    correlated noise of real cameras. The blur keeps every image's total count.
    """

    def __init__(self, seed=None, detector_correlation_max=0.0, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.seed = seed
        self.detector_correlation_max = float(detector_correlation_max)
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, counts, training=None):
        if not training:
            return counts
        seed = self.seed_generator.next()
        replica = tf.distribute.get_replica_context()
        if replica is not None:  # different noise on each replica of a distributed step
            seed = seed + tf.cast(replica.replica_id_in_sync_group, seed.dtype)
        noisy = poisson_sample(counts, seed)
        if self.detector_correlation_max > 0.0:  # detector MTF: neighbour-correlated noise
            correlation = tf.random.stateless_uniform(
                tf.shape(counts)[:1], seed=tf.cast(seed, tf.int64) + tf.constant([0, 7919], tf.int64),
                maxval=self.detector_correlation_max, dtype=tf.float32)
            noisy = detector_blur(noisy, correlation)
        return noisy

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "seed": self.seed,
                "detector_correlation_max": self.detector_correlation_max}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class NormalizeIntensity(keras.layers.Layer):
    """Divide each image by its own mean and subtract 1: ``counts / mean(counts) − 1``.

    Scaling the input by any factor (dose, detector gain, counts vs. intensity) leaves the result
    unchanged, and its expectation is the same at every dose: only the noise differs.
    """

    def __init__(self, epsilon=1e-6, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def call(self, image):
        mean = tf.reduce_mean(image, axis=(1, 2, 3), keepdims=True)
        return image / tf.maximum(mean, self.epsilon) - 1.0

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class NormalizeToVacuum(keras.layers.Layer):
    """Divide each image by its vacuum level and subtract 1: ``counts / vacuum − 1``.

    The vacuum level is the ``quantile`` of the image's local means over ``tile_px`` × ``tile_px``
    windows (stride ``tile_px // 2``): the bright, structure-free part of the frame, whatever its
    share. Unlike :class:`NormalizeIntensity`, the result does not depend on how much vacuum the
    frame holds: a frame's mean falls with the share of particle in it (aperture losses), and
    since one atom changes a column's contrast by a few per cent, a frame-mean reference read the
    same particle up to an atom higher in a wider field of view (docs/model.md, "Framing").
    Vacuum maps to 0, so the zero padding of :class:`PadToMultiple` looks like vacuum. Still
    invariant to the dose and detector gain (any scale of the input). Needs vacuum in at least
    ``1 − quantile`` of the frame; a frame filled by the particle is normalised to its brightest
    parts instead. Built from ``keras.ops`` only.
    """

    def __init__(self, tile_px=20, quantile=0.9, epsilon=1e-6, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.tile_px = int(tile_px)
        self.quantile = float(quantile)
        self.epsilon = epsilon

    def vacuum_level(self, image):
        """The vacuum level of each image of ``image (B, H, W, 1)``: ``(B, 1, 1, 1)``."""
        ops = keras.ops
        local = ops.average_pool(image, self.tile_px, strides=max(1, self.tile_px // 2),
                                 padding="same")
        flat = ops.sort(ops.reshape(local, (ops.shape(local)[0], -1)), axis=-1)
        n = ops.shape(flat)[1]
        index = ops.cast(ops.floor(self.quantile * ops.cast(n - 1, "float32")), "int32")
        level = ops.take(flat, ops.reshape(index, (1,)), axis=1)
        return ops.reshape(level, (-1, 1, 1, 1))

    def call(self, image):
        return image / keras.ops.maximum(self.vacuum_level(image), self.epsilon) - 1.0

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "tile_px": self.tile_px, "quantile": self.quantile,
                "epsilon": self.epsilon}


def intensity_normalization(config: ModelConfig) -> keras.layers.Layer:
    """The input normalisation ``config.intensity_reference`` names (frame mean or vacuum)."""
    if config.intensity_reference == "vacuum":
        tile = max(2, round(config.vacuum_tile_A / config.pixel_size_A))
        return NormalizeToVacuum(tile, config.vacuum_quantile, name="normalize_intensity")
    return NormalizeIntensity(name="normalize_intensity")


@keras.saving.register_keras_serializable(package=_PACKAGE)
class PadToMultiple(keras.layers.Layer):
    """Pad height and width at the bottom/right with zeros up to a multiple of ``multiple``."""

    def __init__(self, multiple, **kwargs):
        super().__init__(**kwargs)
        self.multiple = multiple

    def call(self, x):
        h, w = tf.shape(x)[1], tf.shape(x)[2]
        pad_h, pad_w = (-h) % self.multiple, (-w) % self.multiple
        return tf.pad(x, [[0, 0], [0, pad_h], [0, pad_w], [0, 0]])

    def compute_output_shape(self, input_shape):
        return (input_shape[0], None, None, input_shape[3])

    def get_config(self):
        return {**super().get_config(), "multiple": self.multiple}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class CropTo(keras.layers.Layer):
    """Crop ``x`` to the height and width of ``reference`` (undoes :class:`PadToMultiple`)."""

    def call(self, x, reference):
        return x[:, : tf.shape(reference)[1], : tf.shape(reference)[2], :]

    def compute_output_shape(self, x_shape, reference_shape):
        return (x_shape[0], reference_shape[1], reference_shape[2], x_shape[3])


def _normalization(kind: str, filters: int):
    if kind == "batch":
        return keras.layers.BatchNormalization()
    if kind == "group":
        return keras.layers.GroupNormalization(groups=min(8, filters))
    return keras.layers.Identity()


def _conv_block(x, filters: int, normalization: str):
    """Two 3×3 convolutions, each followed by normalization and ReLU."""
    for _ in range(2):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=normalization == "none")(x)
        x = _normalization(normalization, filters)(x)
        x = keras.layers.Activation("relu")(x)
    return x


def build_unet(config: ModelConfig = ModelConfig(), *, noise_seed: int | None = None) -> keras.Model:
    """The U-Net from raw counts to per-pixel height probabilities.

    Parameters
    ----------
    config : ModelConfig
        ``depth`` (down-sampling steps), ``base_filters`` (doubled per level), ``normalization``
        ('batch', 'group', 'none'), ``dropout`` (bottleneck), ``max_height`` (classes 0…max_height).
    noise_seed : int, optional
        Seed of the training-time Poisson noise (None: random).

    Returns
    -------
    keras.Model
        Input ``image`` (B, H, W, 1) float32, any H and W, raw counts (expected counts in
        training, where noise is added); output ``probabilities`` (B, H, W, max_height + 1)
        float32, summing to 1 over the last axis.
    """
    config.validate()
    image = keras.Input(shape=(None, None, 1), dtype="float32", name="image")
    x = PoissonNoise(seed=noise_seed, name="poisson_noise")(image)
    x = intensity_normalization(config)(x)
    x = PadToMultiple(2**config.depth, name="pad")(x)

    skips = []
    for level in range(config.depth):
        x = _conv_block(x, config.base_filters * 2**level, config.normalization)
        skips.append(x)
        x = keras.layers.MaxPooling2D(2)(x)

    x = _conv_block(x, config.base_filters * 2**config.depth, config.normalization)
    x = keras.layers.Dropout(config.dropout)(x)

    for level in reversed(range(config.depth)):
        filters = config.base_filters * 2**level
        x = keras.layers.Conv2DTranspose(filters, 2, strides=2, padding="same")(x)
        x = keras.layers.Concatenate()([x, skips[level]])
        x = _conv_block(x, filters, config.normalization)

    x = CropTo(name="crop")(x, image)
    logits = keras.layers.Conv2D(config.max_height + 1, 1, name="logits")(x)
    probabilities = keras.layers.Activation("softmax", dtype="float32", name="probabilities")(logits)
    return keras.Model(image, probabilities, name="ceriakeras_unet")


# --- the context U-Net (version 3) ---------------------------------------------------------------
OPTICS_OUTPUTS = (("defocus_nm", 0.0, 12.0), ("cs_um", 0.0, 25.0),
                  ("max_column_height_atoms", 7.0, 7.0))
"""The per-frame optics the global branch estimates, in the order of the ``optics`` output:
(name with unit, centre, scale). The network's dense layer predicts ``(value − centre) / scale``
(targets of order 1); :class:`Affine` turns that into physical units, and the training loss
compares in the normalised units. ``max_column_height_atoms`` is the largest Ce column height in
the whole training image, a scale of the particle's thickness."""


@keras.saving.register_keras_serializable(package=_PACKAGE)
class AddGlobal(keras.layers.Layer):
    """Add a per-image vector ``g (B, C)`` to every pixel of ``x (B, H, W, C)``."""

    def call(self, x, g):
        return x + keras.ops.cast(g, x.dtype)[:, None, None, :]

    def compute_output_shape(self, x_shape, g_shape):
        return x_shape


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Affine(keras.layers.Layer):
    """Fixed per-channel ``x * scale + centre`` (normalised units → physical units)."""

    def __init__(self, centre, scale, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.centre = [float(c) for c in centre]
        self.scale = [float(c) for c in scale]

    def call(self, x):
        x = keras.ops.cast(x, "float32")
        return x * keras.ops.convert_to_tensor(self.scale) + keras.ops.convert_to_tensor(self.centre)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "centre": self.centre, "scale": self.scale}


def _context_filters(config: ModelConfig, level: int) -> int:
    """Filters at ``level`` (1 … depth; pixel size ``pixel_size_A * 2**level``)."""
    return min(config.base_filters * 2 ** (level - 1), config.max_filters)


def build_context_unet(config: ModelConfig, *, noise_seed: int | None = None) -> keras.Model:
    """The context U-Net of model version 3: cheap context from a coarse internal grid.

    ::

        image (B, H, W, 1) counts → PoissonNoise (+ detector MTF) → NormalizeIntensity → pad
          f0 = conv 3×3 (full_resolution_filters) at the model's pixel size (0.2 Å)
          stem: stride-2 conv 3×3 → level 1 (0.4 Å), conv block
          levels 2 … depth: max-pool, conv block (filters doubled, ≤ max_filters)
          bottleneck (0.2 Å · 2**depth, e.g. 6.4 Å): dilated 3×3 convs (``dilations``)
          global branch: global average (or max) pool → dense(global_units) → dense → added to every
              bottleneck pixel;  → dense(3) → ``optics`` (defocus nm, Cs µm, largest height)
          decoder: transposed conv up, concatenate (or add) the skip, conv block, up to level 1
          transposed conv to full resolution + f0 → conv 3×3 → logits → crop → softmax

    Almost all work happens at 0.4 Å and coarser; at depth 5 the analytic receptive field
    (:func:`receptive_field_px`) is well over 320 px = 64 Å without the global branch, which
    sees the whole frame.

    Parameters
    ----------
    config : ModelConfig
        ``architecture='context_unet'``, ``depth``, ``base_filters``, ``max_filters``,
        ``full_resolution_filters``, ``dilations``, ``skip_merge``, ``global_branch``, ``global_units``,
        ``normalization``, ``dropout``, ``max_height``, ``detector_correlation_max``.
    noise_seed : int, optional
        Seed of the training-time noise.

    Returns
    -------
    keras.Model
        Input ``image`` (B, H, W, 1) float32, any H and W. Output: with the global branch a dict
        ``{'probabilities': (B, H, W, max_height + 1), 'optics': (B, 3)}`` (float32; optics in
        the units of :data:`OPTICS_OUTPUTS`), without it the probabilities alone.
    """
    config.validate()
    image = keras.Input(shape=(None, None, 1), dtype="float32", name="image")
    x = PoissonNoise(seed=noise_seed, detector_correlation_max=config.detector_correlation_max,
                     name="poisson_noise")(image)
    x = intensity_normalization(config)(x)
    x = PadToMultiple(2**config.depth, name="pad")(x)
    full, x, skips = _context_encoder(x, config)
    optics = None
    if config.global_branch:
        x, optics = _global_branch(x, config)
    x = keras.layers.Dropout(config.dropout)(x)
    probabilities = _context_decoder(x, full, skips, image, config)
    if optics is None:
        return keras.Model(image, probabilities, name="ceriakeras_context_unet")
    return keras.Model(image, {"probabilities": probabilities, "optics": optics},
                       name="ceriakeras_context_unet")


def _context_conv(x, filters: int, normalization: str, *, dilation: int = 1, strides: int = 1):
    """Conv 3×3 (bias only without normalization), normalization, ReLU."""
    x = keras.layers.Conv2D(filters, 3, strides=strides, dilation_rate=dilation,
                            padding="same", use_bias=normalization == "none")(x)
    x = _normalization(normalization, filters)(x)
    return keras.layers.Activation("relu")(x)


def _context_encoder(x, config: ModelConfig):
    """Full-resolution features ``f0``, the bottleneck (after its dilated convs) and the skips
    of levels 1 … depth − 1 of :func:`build_context_unet`."""
    norm = config.normalization
    full = _context_conv(x, config.full_resolution_filters, norm)
    x = _context_conv(full, _context_filters(config, 1), norm, strides=2)  # the strided stem
    skips = []
    for level in range(1, config.depth + 1):
        if level > 1:
            x = keras.layers.MaxPooling2D(2)(x)
        x = _conv_block(x, _context_filters(config, level), norm)
        skips.append(x)
    skips.pop()  # the bottleneck is not a skip
    for rate in config.dilations:
        x = _context_conv(x, _context_filters(config, config.depth), norm, dilation=int(rate))
    return full, x, skips


def _global_branch(x, config: ModelConfig):
    """The bottleneck with the frame's global features added to every pixel, and the
    ``optics`` output (:data:`OPTICS_OUTPUTS`)."""
    pool = (keras.layers.GlobalMaxPooling2D if config.global_pool == "max"
            else keras.layers.GlobalAveragePooling2D)
    g = pool(name="global_pool")(x)
    g = keras.layers.Dense(config.global_units, activation="relu", name="global_dense")(g)
    bottleneck = _context_filters(config, config.depth)
    x = AddGlobal(name="global_add")(x, keras.layers.Dense(bottleneck, name="global_back")(g))
    z = keras.layers.Dense(len(OPTICS_OUTPUTS), dtype="float32", name="optics_normalised")(g)
    optics = Affine([c for _, c, _ in OPTICS_OUTPUTS], [s for _, _, s in OPTICS_OUTPUTS],
                    name="optics")(z)
    return x, optics


def _context_decoder(x, full, skips: list, image, config: ModelConfig):
    """Up from the bottleneck through the skips to full resolution: the probabilities."""
    norm = config.normalization
    for level in reversed(range(1, config.depth)):
        filters = _context_filters(config, level)
        x = keras.layers.Conv2DTranspose(filters, 2, strides=2, padding="same")(x)
        merge = keras.layers.Add if config.skip_merge == "add" else keras.layers.Concatenate
        x = merge()([x, skips[level - 1]])
        x = _conv_block(x, filters, norm)
    x = keras.layers.Conv2DTranspose(config.full_resolution_filters, 2, strides=2,
                                     padding="same")(x)
    x = keras.layers.Add()([x, full])
    x = _context_conv(x, config.full_resolution_filters, norm)
    x = CropTo(name="crop")(x, image)
    logits = keras.layers.Conv2D(config.max_height + 1, 1, name="logits")(x)
    return keras.layers.Activation("softmax", dtype="float32", name="probabilities")(logits)


def build_model(config: ModelConfig = ModelConfig(), *, noise_seed: int | None = None) -> keras.Model:
    """The network ``config.architecture`` names: :func:`build_unet` or :func:`build_context_unet`."""
    config.validate()
    if config.architecture == "context_unet":
        return build_context_unet(config, noise_seed=noise_seed)
    return build_unet(config, noise_seed=noise_seed)


def split_outputs(outputs):
    """``(probabilities, optics or None)`` from a model's output, a tensor or a dict."""
    if isinstance(outputs, dict):
        return outputs["probabilities"], outputs.get("optics")
    return outputs, None


def has_optics(model: keras.Model) -> bool:
    """Whether the model has the ``optics`` output of the global branch."""
    return isinstance(model.output, dict) and "optics" in model.output


def receptive_field_px(model: keras.Model, output: str = "probabilities") -> float:
    """The theoretical receptive field of one output pixel, in input pixels (a side length).

    Walks the functional graph in order and propagates, per tensor, the receptive field ``r``
    and the input-pixel spacing ``j`` of its grid: a convolution or pooling of kernel ``k``,
    stride ``s`` and dilation ``d`` gives ``r + (k − 1)·d·j`` and ``j·s``; a transposed
    convolution of stride ``s`` gives ``j / s`` and ``r + (k − 1)·j / s``; a merge takes the
    largest ``r``; global pooling gives infinity. Layers that act per pixel change nothing.

    Parameters
    ----------
    model : keras.Model
        A functional model from :func:`build_model`.
    output : str
        Output name ('probabilities').

    Returns
    -------
    float
        Side of the square input window that can influence one output pixel, px (``inf`` if
        a global pooling reaches the output).
    """
    field: dict[int, tuple[float, float]] = {id(t): (1.0, 1.0) for t in model.inputs}
    for layer in model.layers:
        for node in layer._inbound_nodes:
            inputs = [field.get(id(t), (1.0, 1.0)) for t in node.input_tensors]
            r = max((f[0] for f in inputs), default=1.0)
            j = max((f[1] for f in inputs), default=1.0)
            if isinstance(layer, keras.layers.Conv2DTranspose):
                j = j / layer.strides[0]
                r = r + (layer.kernel_size[0] - 1) * j
            elif isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)):
                r = r + (layer.kernel_size[0] - 1) * layer.dilation_rate[0] * j
                j = j * layer.strides[0]
            elif isinstance(layer, (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D)):
                r = r + (layer.pool_size[0] - 1) * j
                j = j * layer.strides[0]
            elif isinstance(layer, (keras.layers.GlobalAveragePooling2D,
                                    keras.layers.GlobalMaxPooling2D)):
                r = float("inf")
            if isinstance(layer, CropTo):  # the reference only gives the size
                r, j = inputs[0]
            for t in node.output_tensors:
                field[id(t)] = (r, j)
    target = model.output[output] if isinstance(model.output, dict) else model.output
    return field[id(target)][0]


def load_checkpoint(path, *, compile: bool = True, instead: str) -> keras.Model:
    """Load a ``.keras`` checkpoint in Keras' safe mode (no Python code from the file runs).

    Parameters
    ----------
    path : str or Path
        The ``.keras`` file.
    compile : bool
        Restore the optimizer and loss too (for resuming training).
    instead : str
        What the user should do if the file is refused (ends the error message).

    Raises
    ------
    ModelError
        If the file holds Python code (e.g. a ``Lambda`` layer) that safe mode refuses.
    """
    try:
        return keras.saving.load_model(path, compile=compile, safe_mode=True)
    except ValueError as err:
        if "safe_mode" not in str(err):
            raise
        raise ModelError(f"{path} holds Python code (e.g. a Lambda layer) that Keras' safe mode "
                         f"refuses to load; {instead}") from None
