"""The DDPM U-Net (Ho et al. 2020, appendix B), built as a functional Keras model.

PixelCNN++-style: residual blocks with the time embedding added after their first convolution,
self-attention at chosen resolutions, strided-conv down-sampling, nearest + conv up-sampling,
skip connections concatenated on the way up, and an output convolution initialised to zero.
Everything except the sinusoidal embedding is a built-in Keras layer, so the model saves,
loads and exports like any functional model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from kddpm.errors import KddpmError
from kddpm.streams import current_example_keys, example_uniforms, fold_in


@keras.saving.register_keras_serializable(package="kddpm")
class SinusoidalEmbedding(keras.layers.Layer):
    """The Transformer's sinusoidal embedding of an integer timestep.

    Input t: [B] int32 in [0, T). Output: [B, dim], sin(t w_k) for the first half of the
    features and cos(t w_k) for the second, w_k = 10000^(-k / (dim/2 - 1)).
    """

    def __init__(self, dim: int, **kwargs):
        super().__init__(**kwargs)
        if dim < 4:
            raise KddpmError(f"The time embedding needs dim >= 4, got {dim}.")
        self.dim = int(dim)

    def call(self, t):
        half = self.dim // 2
        scale = math.log(10000.0) / (half - 1)
        frequencies = tf.exp(tf.range(half, dtype=tf.float32) * -scale)
        angles = tf.cast(t, tf.float32)[:, None] * frequencies[None, :]
        embedding = tf.concat([tf.sin(angles), tf.cos(angles)], axis=1)
        if self.dim % 2:
            embedding = tf.pad(embedding, [[0, 0], [0, 1]])
        return tf.cast(embedding, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.dim)

    def get_config(self):
        return {**super().get_config(), "dim": self.dim}


@keras.saving.register_keras_serializable(package="kddpm")
class ExampleDropout(keras.layers.Dropout):
    """Dropout whose mask for each example is keyed by the example's place in the global batch.

    Inside ``kddpm.streams.example_keys(key, first)`` (DiffusionModel's train step sets it),
    row j's mask is drawn from ``fold_in(key, stream)`` at position ``first + j``: each
    example of the global batch gets its own mask, the same on one device, N replicas or N
    workers, and a function of (seed, step, position) so that resuming repeats it. Outside
    that context it is Keras' Dropout.

    stream: this layer's number within the network, so that layers draw different masks.
    """

    def __init__(self, rate: float, stream: int = 0, **kwargs):
        super().__init__(rate, **kwargs)
        self.stream = int(stream)

    def call(self, inputs, training=False):
        keys = current_example_keys()
        if not training or self.rate == 0 or keys is None:
            return super().call(inputs, training=training)
        key, first = keys
        uniform = example_uniforms(fold_in(key, self.stream), first, tf.shape(inputs)[0], inputs.shape[1:])
        keep = tf.cast(uniform >= self.rate, inputs.dtype)
        return inputs * keep / tf.cast(1.0 - self.rate, inputs.dtype)

    def get_config(self):
        return {**super().get_config(), "stream": self.stream}


@keras.saving.register_keras_serializable(package="kddpm")
class GroupNorm(keras.layers.Layer):
    """Group normalisation (Wu & He 2018) of [B, H, W, C] feature maps, per-channel scale and shift.

    Same maths as ``keras.layers.GroupNormalization``; the statistics are reduced over H and W
    first (a contiguous reduction) and then averaged over each group's channels with a small
    matmul, which trains the U-Net about 15% faster on CPU. Statistics are taken in float32.
    """

    def __init__(self, groups: int = 32, epsilon: float = 1e-6, **kwargs):
        super().__init__(**kwargs)
        self.groups = int(groups)
        self.epsilon = float(epsilon)

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels % self.groups:
            raise KddpmError(f"GroupNorm: {self.groups} groups do not divide {channels} channels.")
        self.gamma = self.add_weight(shape=(channels,), initializer="ones", name="gamma")
        self.beta = self.add_weight(shape=(channels,), initializer="zeros", name="beta")
        size = channels // self.groups
        # [C, C] matrix averaging each channel's value over the channels of its group.
        self._group_average = np.kron(np.eye(self.groups), np.full((size, size), 1.0 / size)).astype(np.float32)

    def call(self, x):
        channels = x.shape[-1]
        x = tf.cast(x, tf.float32)

        def group_mean(per_channel):  # [B, C] -> [B, 1, 1, C]
            return tf.reshape(tf.matmul(per_channel, self._group_average), [-1, 1, 1, channels])

        centred = x - group_mean(tf.reduce_mean(x, axis=[1, 2]))
        variance = group_mean(tf.reduce_mean(tf.square(centred), axis=[1, 2]))
        scale = tf.math.rsqrt(variance + self.epsilon) * tf.cast(self.gamma, tf.float32)
        return tf.cast(centred * scale + tf.cast(self.beta, tf.float32), self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "groups": self.groups, "epsilon": self.epsilon}


def build_unet(
    image_shape: Sequence[int] = (32, 32, 3),
    base_channels: int = 128,
    channel_mults: Sequence[int] = (1, 2, 2, 2),
    num_res_blocks: int = 2,
    attention_resolutions: Sequence[int] = (16,),
    dropout: float = 0.1,
    norm_groups: int = 32,
    name: str = "unet",
    seed: int | None = None,
    norm_epsilon: float = 1e-6,
    num_classes: int | None = None,
) -> keras.Model:
    """The paper's noise-prediction network eps_theta(x_t, t).

    Args:
        image_shape: (H, W, C); H and W must be divisible by 2 ** (len(channel_mults) - 1).
        base_channels: channels at full resolution; level i has base_channels * channel_mults[i].
        channel_mults: one multiplier per resolution level; every level but the last halves H, W.
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attention_resolutions: feature-map heights at which self-attention blocks are added.
        dropout: dropout rate inside the residual blocks (the paper: 0.1 on CIFAR-10).
        norm_groups: GroupNorm groups (the paper: 32); must divide every level's channels.
        seed: an int makes the initial weights a function of it alone; None draws them from
            Keras' global generator (``keras.utils.set_random_seed``), as any Keras layer does.
        norm_epsilon: the GroupNorm epsilon (the paper's code: 1e-6).
        num_classes: K makes the network class-conditional (Ho & Salimans 2022): a third input
            ``label`` [B] int32 in [0, K], K being the null ("unconditional") label, whose
            learned embedding (an ``Embedding(K + 1, 4 * base_channels)``) is added to the time
            embedding, as in improved-diffusion. None: unconditional, exactly as without it.

    Layers are named after their place, e.g. ``down_1_res_0_conv1``, ``mid_attn_q``,
    ``up_2_attn_1_out``: ``kddpm.interop`` maps those names to diffusers' parameter names.

    Returns:
        A functional ``keras.Model`` with inputs ``x_t`` [B, H, W, C] float32 and ``t`` [B]
        int32 in [0, T) (and ``label`` [B] int32 in [0, K] when conditional), and output
        ``eps`` [B, H, W, C] float32.
    """
    try:
        height, width, channels = (int(d) for d in image_shape)
    except (TypeError, ValueError):
        raise KddpmError(f"image_shape must be (height, width, channels), got {image_shape!r}.") from None
    if min(height, width, channels) < 1:
        raise KddpmError(f"image_shape must be positive sizes, got {tuple(image_shape)}.")
    levels = len(channel_mults)
    if levels < 1 or num_res_blocks < 1 or base_channels < 1:
        raise KddpmError("channel_mults must be non-empty, num_res_blocks and base_channels positive.")
    factor = 2 ** (levels - 1)
    if height % factor or width % factor:
        raise KddpmError(
            f"Image size {height}x{width} cannot be halved {levels - 1} times by channel_mults "
            f"{tuple(channel_mults)}: use a size divisible by {factor} (pad the images, e.g. "
            f"{_round_up(height, factor)}x{_round_up(width, factor)}) or fewer levels."
        )
    for mult in channel_mults:
        if (base_channels * mult) % norm_groups:
            raise KddpmError(
                f"norm_groups={norm_groups} does not divide {base_channels * mult} channels; "
                "choose base_channels and norm_groups so that every level's channels are a multiple."
            )

    sizes = [height // 2**level for level in range(levels)]
    unmatched = sorted(set(attention_resolutions) - set(sizes))
    if unmatched:
        raise KddpmError(
            f"attention_resolutions {tuple(attention_resolutions)}: {unmatched} match no feature-map height of "
            f"this U-Net ({sizes} for {height}x{width} images); use heights from that list, or () for none."
        )

    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
    ):
        raise KddpmError(f"num_classes must be a positive integer (or None: unconditional), got {num_classes!r}.")

    x_t = keras.Input(shape=(height, width, channels), dtype="float32", name="x_t")
    t = keras.Input(shape=(), dtype="int32", name="t")
    inputs = [x_t, t]

    block = _Blocks(dropout, norm_groups, seed, norm_epsilon)
    time_channels = 4 * base_channels
    temb = SinusoidalEmbedding(base_channels, name="time_sinusoidal")(t)
    temb = block.dense(time_channels, name="time_dense_0")(temb)
    temb = keras.layers.Activation("silu", name="time_silu")(temb)
    temb = block.dense(time_channels, name="time_dense_1")(temb)
    if num_classes is not None:
        label = keras.Input(shape=(), dtype="int32", name="label")
        inputs.append(label)
        initializer = keras.initializers.RandomNormal(stddev=1.0, seed=None if seed is None else seed * 100_003)
        class_embedding = keras.layers.Embedding(
            num_classes + 1, time_channels, embeddings_initializer=initializer, name="class_embedding"
        )(label)
        temb = keras.layers.Add(name="time_and_class")([temb, class_embedding])
    # Every residual block reads swish(temb); computing it once changes nothing in the maths.
    temb = keras.layers.Activation("silu", name="time_embedding")(temb)

    h = block.conv(base_channels, 3, padding="same", name="conv_in")(x_t)
    skips = [h]
    for level, mult in enumerate(channel_mults):
        for i in range(num_res_blocks):
            h = block.res(h, temb, base_channels * mult, f"down_{level}_res_{i}")
            if h.shape[1] in attention_resolutions:
                h = block.attention(h, f"down_{level}_attn_{i}")
            skips.append(h)
        if level != levels - 1:
            h = block.conv(h.shape[-1], 3, strides=2, padding="same", name=f"down_{level}")(h)
            skips.append(h)

    h = block.res(h, temb, h.shape[-1], "mid_res_0")
    h = block.attention(h, "mid_attn")
    h = block.res(h, temb, h.shape[-1], "mid_res_1")

    for level in reversed(range(levels)):
        for i in range(num_res_blocks + 1):
            h = keras.layers.Concatenate(name=f"up_{level}_skip_{i}")([h, skips.pop()])
            h = block.res(h, temb, base_channels * channel_mults[level], f"up_{level}_res_{i}")
            if h.shape[1] in attention_resolutions:
                h = block.attention(h, f"up_{level}_attn_{i}")
        if level != 0:
            h = keras.layers.UpSampling2D(2, interpolation="nearest", name=f"up_{level}")(h)
            h = block.conv(h.shape[-1], 3, padding="same", name=f"up_{level}_conv")(h)

    h = GroupNorm(norm_groups, norm_epsilon, name="norm_out")(h)
    h = keras.layers.Activation("silu", name="out_silu")(h)
    eps = block.conv(channels, 3, padding="same", kernel_initializer="zeros", dtype="float32", name="eps")(h)
    return keras.Model(inputs=inputs, outputs=eps, name=name)


class _Blocks:
    """Builders for the U-Net's repeated blocks; they only wire built-in layers together."""

    def __init__(self, dropout: float, norm_groups: int, seed: int | None = None, norm_epsilon: float = 1e-6):
        self.dropout = dropout
        self.norm_groups = norm_groups
        self.norm_epsilon = norm_epsilon
        self.seed = seed
        self._layers_seeded = 0
        self._dropout_layers = 0

    def _next_seed(self) -> int | None:
        """A distinct seed per layer, derived from the network's seed (None: Keras' global one)."""
        if self.seed is None:
            return None
        self._layers_seeded += 1
        return self.seed * 100_003 + self._layers_seeded

    def conv(self, filters: int, kernel_size: int, **kwargs) -> keras.layers.Conv2D:
        kwargs.setdefault("kernel_initializer", keras.initializers.GlorotUniform(seed=self._next_seed()))
        return keras.layers.Conv2D(filters, kernel_size, **kwargs)

    def dense(self, units: int, **kwargs) -> keras.layers.Dense:
        kwargs.setdefault("kernel_initializer", keras.initializers.GlorotUniform(seed=self._next_seed()))
        return keras.layers.Dense(units, **kwargs)

    def _norm(self, h, name: str | None):
        return GroupNorm(self.norm_groups, self.norm_epsilon, name=name)(h)

    def res(self, x, temb, out_channels: int, name: str):
        """GroupNorm -> swish -> conv3x3, + dense(temb), GroupNorm -> swish -> dropout -> conv3x3."""
        h = keras.layers.Activation("silu", name=f"{name}_silu1")(self._norm(x, f"{name}_norm1"))
        h = self.conv(out_channels, 3, padding="same", name=f"{name}_conv1")(h)
        time = self.dense(out_channels, name=f"{name}_time")(temb)
        time = keras.layers.Reshape((1, 1, out_channels), name=f"{name}_time_map")(time)
        h = keras.layers.Add(name=f"{name}_add_time")([h, time])
        h = keras.layers.Activation("silu", name=f"{name}_silu2")(self._norm(h, f"{name}_norm2"))
        if self.dropout:
            self._dropout_layers += 1
            h = ExampleDropout(
                self.dropout, stream=self._dropout_layers, seed=self._next_seed(), name=f"{name}_dropout"
            )(h)
        # The residual branch starts at zero so that each block begins as the identity.
        h = self.conv(out_channels, 3, padding="same", kernel_initializer="zeros", name=f"{name}_conv2")(h)
        if x.shape[-1] != out_channels:
            x = self.conv(out_channels, 1, name=f"{name}_shortcut")(x)
        return keras.layers.Add(name=f"{name}_out")([x, h])

    def attention(self, x, name: str | None = None):
        """Single-head self-attention over the H*W positions, added to the un-normalised input.

        q, k, v and the output projection are the original code's four 1x1 "NIN" layers; the
        scores q k^T are scaled by C ** -0.5 (folded into q) before the softmax.
        """
        height, width, channels = x.shape[1:]

        def part(suffix):  # layer names after the block's place; Keras' own names without one
            return None if name is None else f"{name}_{suffix}"

        h = keras.layers.Reshape((height * width, channels), name=part("flatten"))(self._norm(x, part("norm")))
        query = self.dense(channels, name=part("q"))(h)
        query = keras.layers.Rescaling(channels**-0.5, name=part("scale"))(query)
        key = self.dense(channels, name=part("k"))(h)
        value = self.dense(channels, name=part("v"))(h)
        h = keras.layers.Attention(name=part("softmax"))([query, value, key])
        # The output projection starts at zero (the original code's proj_out, init_scale=0), so
        # that each attention block begins as the identity, like the residual blocks.
        h = self.dense(channels, kernel_initializer="zeros", name=part("out"))(h)
        h = keras.layers.Reshape((height, width, channels), name=part("unflatten"))(h)
        return keras.layers.Add(name=part("residual"))([x, h])


def _round_up(value: int, factor: int) -> int:
    return -(-value // factor) * factor
