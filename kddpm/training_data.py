"""Checks of the training data, without making each step wait for the device.

A train step flags images far outside [-1, 1] and labels outside [0, K) on the device (and, without
a strategy, skips its update); ``TrainingDataChecks`` reads those flags once per
``DATA_CHECK_EVERY`` steps and at each epoch's end and raises then, naming the first bad step.
The shape and dtype checks of a batch happen while tracing, before any step runs.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from kddpm import labels as _labels
from kddpm.errors import KddpmError

# Training images must lie in [-1, 1]; this bound only catches data that was never scaled
# (0..255, or standardised with large outliers), leaving room for resampling overshoot.
MAX_ABS_PIXEL = 1.5
OUT_OF_RANGE = "Training images lie far outside [-1, 1]; scale them to [-1, 1] (x / 127.5 - 1 for 0..255 data)."
OUT_OF_RANGE_KEY = "data_out_of_range"
BAD_LABELS_KEY = "labels_out_of_range"
# The host reads the train steps' data flags once per this many steps (and at every epoch's end),
# not after every step, which would make each step wait for the device.
DATA_CHECK_EVERY = 100


class TrainingDataChecks:
    """The DiffusionModel half that checks what ``fit`` feeds it (mixed into the keras.Model)."""

    def make_train_function(self, force=False):
        """Keras' train function, raising KddpmError once a step has seen out-of-range data.

        Without a distribution strategy a step on bad data applies no update (see train_step);
        its flag is kept on the device and read with the others every ``DATA_CHECK_EVERY`` steps
        and at each epoch's end, so that no step waits for the host. The error names the first
        bad step. Under a strategy the step's assert raises at once.
        """
        if self.train_function is not None and not force:
            return self.train_function
        super().make_train_function(force=force)
        step = self.train_function
        self._pending_data_checks = []
        self._steps_run = 0

        def checked(iterator):
            try:
                logs = dict(step(iterator))
            except tf.errors.InvalidArgumentError as error:
                messages = [OUT_OF_RANGE, _labels.bad_training_labels_message(self.num_classes or 0)]
                for message in messages:
                    if message in str(error):
                        raise KddpmError(message) from None
                raise
            self._steps_run += 1
            flags = tf.stack([tf.reduce_max(logs.pop(OUT_OF_RANGE_KEY)), tf.reduce_max(logs.pop(BAD_LABELS_KEY))])
            self._pending_data_checks.append(flags)
            if len(self._pending_data_checks) >= DATA_CHECK_EVERY:
                self.check_training_data()
            return logs

        self.train_function = checked
        return checked

    def check_training_data(self) -> None:
        """Reads the data flags of the steps run since the last check (one host read); raises
        KddpmError naming the first step that saw images outside [-1, 1] or bad labels."""
        pending, self._pending_data_checks = self._pending_data_checks, []
        if not pending:
            return
        flags = tf.stack(pending).numpy()
        bad = np.flatnonzero(flags.max(axis=1) > 0)
        if bad.size:
            first = int(bad[0])
            step = getattr(self, "_steps_run", len(pending)) - len(pending) + first + 1
            message = OUT_OF_RANGE if flags[first, 0] > 0 else _labels.bad_training_labels_message(self.num_classes)
            raise KddpmError(f"{message} (first at step {step} of this fit; that step's update was skipped)")

    def get_metrics_result(self):
        # Keras asks for the epoch's metrics at every epoch's end: the pending data checks are read first.
        self.check_training_data()
        return super().get_metrics_result()

    def _images_and_labels(self, data) -> tuple[tf.Tensor, tf.Tensor | None]:
        """The image batch of ``data`` and, for a conditional model, its int32 labels [B]."""
        images = self._images(data)
        if self.num_classes is None:
            return images, None
        if not isinstance(data, (tuple, list)) or len(data) < 2 or data[1] is None:
            raise KddpmError(
                f"This model is class-conditional ({self.num_classes} classes): train it on (images, labels) "
                "pairs, e.g. kddpm.load_dataset(...) with its labels, not on images alone."
            )
        labels = data[1]
        if not labels.dtype.is_integer:
            raise KddpmError(f"Labels are {labels.dtype.name}; give integer class indices in [0, {self.num_classes}).")
        labels = tf.reshape(tf.cast(labels, tf.int32), [-1])
        return images, labels

    def _images(self, data) -> tf.Tensor:
        """The image batch of ``data`` (images, or (images, labels)), checked against the network."""
        images = data[0] if isinstance(data, (tuple, list)) else data
        if isinstance(images, dict):
            raise KddpmError("Training data must be images or (images, labels) pairs, not a dict.")
        if images.dtype != tf.float32:
            raise KddpmError(
                f"Training images are {images.dtype.name}; convert them to float32 in [-1, 1] "
                "(x / 127.5 - 1 for uint8), as kddpm.load_dataset does."
            )
        if images.shape.rank != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise KddpmError(
                f"Training images have shape {tuple(images.shape)} but the denoiser expects "
                f"[B, {', '.join(map(str, self.image_shape))}]; resize or pad the data "
                "(kddpm.load_dataset(..., image_size=...)) or build the network for this shape."
            )
        return images
