"""The U-Net that labels each pixel with the height of the Ce column under it, and its input layers.

The network reads raw detector counts (or any linear intensity) of any size::

    image (B, H, W, 1) counts
      → PoissonNoise            fresh shot noise on expected counts, training only
      → NormalizeIntensity      counts / image mean − 1 (dose- and gain-invariant)
      → PadToMultiple           pad H, W up to a multiple of 2**depth
      → U-Net (depth levels)    conv-norm-relu ×2, max-pool down, transposed conv up, skips
      → CropTo                  back to H × W
      → softmax                 (B, H, W, max_height + 1) float32, class k = k Ce atoms, 0 = none

All custom layers are registered, so a saved ``.keras`` file loads with ``safe_mode=True``.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from .config import ModelConfig, ModelError
from .pipeline import poisson_sample

_PACKAGE = "ceriakeras"


@keras.saving.register_keras_serializable(package=_PACKAGE)
class PoissonNoise(keras.layers.Layer):
    """Replace expected counts by a Poisson draw of them, only when ``training=True``.

    The input holds *expected* electron counts per pixel (noise-free intensity × dose × pixel
    area); each call in training draws new noise (a :class:`keras.random.SeedGenerator` advances
    its state every step), so every epoch sees fresh noise. At inference it is the identity.
    """

    def __init__(self, seed=None, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, counts, training=None):
        if not training:
            return counts
        seed = self.seed_generator.next()
        replica = tf.distribute.get_replica_context()
        if replica is not None:  # different noise on each replica of a distributed step
            seed = seed + tf.cast(replica.replica_id_in_sync_group, seed.dtype)
        return poisson_sample(counts, seed)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}


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
    x = NormalizeIntensity(name="normalize_intensity")(x)
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
