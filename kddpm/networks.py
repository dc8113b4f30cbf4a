"""Copies of a denoiser: the EMA copy a DiffusionModel keeps, and copies computing in another precision."""

from __future__ import annotations

import keras
import tensorflow as tf

from kddpm.errors import KddpmError


def copy_network(network: keras.Model, image_shape: tuple[int, int, int], num_classes: int | None = None):
    """A new network of the same architecture holding a copy of ``network``'s weights."""
    try:
        copy = keras.models.clone_model(network)
    except Exception as error:  # clone_model raises many types for unserialisable models
        raise KddpmError(
            f"Cannot copy the denoiser for its EMA weights ({error}); give the model a get_config()."
        ) from error
    if not copy.built or len(copy.weights) != len(network.weights):
        batch = 1
        labels = [] if num_classes is None else [tf.zeros((batch,), tf.int32)]
        copy([tf.zeros((batch, *image_shape)), tf.zeros((batch,), tf.int32), *labels])
    copy.set_weights(network.get_weights())
    return copy


def network_with_precision(network: keras.Model, precision: str) -> keras.Model:
    """``network`` computing in ``precision`` ('float32' or 'bfloat16'), with the same float32 weights.

    The network is returned as it is when it already computes so; otherwise a copy whose layers
    take the mixed policy ('mixed_bfloat16') or 'float32'. Output layers stay float32, as the
    U-Net builds them, so that eps and the sampler's arithmetic are float32 either way.
    """
    policy = {"float32": "float32", "bfloat16": "mixed_bfloat16"}.get(precision)
    if policy is None:
        raise KddpmError(f"Unknown sampling precision {precision!r}; use 'float32' or 'bfloat16'.")
    outputs = {tensor._keras_history.operation.name for tensor in network.outputs}
    wanted = {layer.name: "float32" if layer.name in outputs else policy for layer in network.layers}
    if all(layer.dtype_policy.name == wanted[layer.name] for layer in network.layers if layer.weights):
        return network

    def with_policy(layer):
        return layer.__class__.from_config({**layer.get_config(), "dtype": wanted[layer.name]})

    copy = keras.models.clone_model(network, clone_function=with_policy)
    copy.set_weights(network.get_weights())
    return copy
