"""Per-example random streams: every draw for example i is a function of (key, i) alone.

Training noise, timesteps, dropout masks and the sampler's noise all come from here, so that

* a replica draws only its own examples (O(local batch) work), yet example i of the global
  batch gets the same t, eps and dropout mask on one device, N replicas or N workers;
* image i of a seed is the same whatever the sampling batch size;
* a draw is the same with and without XLA.

How: Philox is a counter-based generator. A key and a 128-bit counter give four 32-bit
integers, and a stateless draw of n integers reads counters c, c+1, ... So example i owns
the block of ``stride`` integers starting at counter ``c + i * stride / 4`` (``stride`` is its
number of integers rounded up to a multiple of 4), and examples [first, first + count) are one
draw starting at that block. Floats are built from the integers here (Box-Muller for normals),
because XLA and the plain graph agree on Philox's integers but not on its floats.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator, Sequence

import tensorflow as tf

# Every stateless draw names its algorithm: "auto_select" picks another one under XLA.
RNG_ALG = "philox"
_PHILOX = 1  # the raw ops' enum value for Philox
_INTEGERS_PER_COUNTER = 4


def seed_pair(seed: int | tf.Tensor) -> tf.Tensor:
    """A user's integer seed (Python int or int64 scalar tensor) as the [2] int64 key of stateless ops."""
    seed = tf.convert_to_tensor(seed, tf.int64)
    return tf.stack([tf.bitwise.bitwise_and(seed, 0x7FFFFFFF), tf.bitwise.right_shift(seed, 31)])


def fold_in(key: tf.Tensor, data: int | tf.Tensor) -> tf.Tensor:
    """A new [2] int64 key from ``key`` and an integer: independent streams for independent uses."""
    return tf.random.experimental.stateless_fold_in(key, tf.cast(data, tf.int64), alg=RNG_ALG)


def example_bits(key: tf.Tensor, first: int | tf.Tensor, count: int | tf.Tensor, per_example: int) -> tf.Tensor:
    """uint32 [count, per_example]: row j is example ``first + j``'s integers from ``key``'s stream."""
    stride = -(-per_example // _INTEGERS_PER_COUNTER) * _INTEGERS_PER_COUNTER
    # Philox's 64-bit key is the key's first word; its second word and the example's offset
    # make the 128-bit counter. (Keys here come from ``fold_in``, so both words are well mixed.)
    words = tf.bitcast(tf.cast(key, tf.int64), tf.uint64)
    offset = tf.cast(first, tf.uint64) * (stride // _INTEGERS_PER_COUNTER)
    philox_key, counter = words[:1], tf.stack([offset, words[1]])
    count = tf.cast(count, tf.int32)
    bits = tf.raw_ops.StatelessRandomUniformFullIntV2(
        shape=tf.reshape(count * stride, [1]), key=philox_key, counter=counter, alg=_PHILOX, dtype=tf.uint32
    )
    return tf.reshape(bits, [count, stride])[:, :per_example]


def _unit_interval(bits: tf.Tensor) -> tf.Tensor:
    """The top 24 bits, centred in their interval: float32 uniform on (0, 1), never 0 or 1."""
    return (tf.cast(tf.bitwise.right_shift(bits, 8), tf.float32) + 0.5) * 2.0**-24


def example_uniforms(key: tf.Tensor, first, count, shape: Sequence[int]) -> tf.Tensor:
    """float32 [count, *shape] uniform on (0, 1), example ``first + j`` in row j."""
    size = math.prod(shape)
    return tf.reshape(_unit_interval(example_bits(key, first, count, size)), [-1, *shape])


def example_normals(key: tf.Tensor, first, count, shape: Sequence[int]) -> tf.Tensor:
    """float32 [count, *shape] N(0, 1) by Box-Muller, example ``first + j`` in row j.

    |z| <= sqrt(2 * 25 * ln 2) = 5.9, since the uniforms are never below 2^-25.
    """
    size = math.prod(shape)
    uniform = _unit_interval(example_bits(key, first, count, 2 * size))
    radius = tf.sqrt(-2.0 * tf.math.log(uniform[:, :size]))
    return tf.reshape(radius * tf.cos(2.0 * math.pi * uniform[:, size:]), [-1, *shape])


def example_integers(key: tf.Tensor, first, count, maxval: int) -> tf.Tensor:
    """int32 [count] on {0, ..., maxval - 1}, example ``first + j`` at j.

    floor(u * maxval) for a 24-bit uniform u: each value has probability within 2^-24 * maxval
    (relative) of 1 / maxval, 6e-5 for T = 1000; exact for powers of two.
    """
    if not 1 <= maxval <= 2**24:
        raise ValueError(f"maxval must be in [1, 2^24], got {maxval}.")
    top = tf.cast(tf.bitwise.right_shift(example_bits(key, first, count, 1)[:, 0], 8), tf.int64)
    return tf.cast(top * maxval // 2**24, tf.int32)


# --- Which examples a layer call is working on --------------------------------------------------

_context = threading.local()


@contextlib.contextmanager
def example_keys(key: tf.Tensor, first: tf.Tensor) -> Iterator[None]:
    """While active (in this thread: one replica), per-example layers key their draws by
    ``key`` and the global position ``first + j`` of row j of their batch."""
    previous = getattr(_context, "keys", None)
    _context.keys = (key, first)
    try:
        yield
    finally:
        _context.keys = previous


def current_example_keys() -> tuple[tf.Tensor, tf.Tensor] | None:
    """(key, first) set by ``example_keys`` in this thread, or None."""
    return getattr(_context, "keys", None)
