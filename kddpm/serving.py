"""The TF Serving signatures of an exported model: the compiled sampling loop behind a request.

Kept apart from :mod:`kddpm.export` (which writes, checks and renames versions) so that the
request-side code, the part a serving user reads, is in one place.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from kddpm.defaults import DEFAULT_SAMPLER, DEFAULT_STEPS, REPAINT_STEPS
from kddpm.model import DiffusionModel
from kddpm.sampling import (
    Sampler,
    ddim_tables,
    ddpm_plan,
    dpm_solver_tables,
    initial_noise,
    to_uint8_tensor,
)
from kddpm.sampling.edits import repaint_plan
from kddpm.sampling.plans import ddim_rows, dpm_solver_rows
from kddpm.streams import seed_pair


def serving_archive(model: DiffusionModel, network: keras.Model, clip_x0: bool) -> keras.export.ExportArchive:
    """The SavedModel's signatures around ``network`` (the EMA denoiser), as a Keras ExportArchive.

    ``serving_default`` (x_t [B, H, W, C] float32 in ~[-1, 1], t [B] int32 -> eps),
    ``sample`` and ``sample_from_noise`` (-> images [B, H, W, C] uint8), and for conditional
    models ``class_names``. Every check a client can fail names the input and its range.
    """
    height, width, channels = model.image_shape
    timesteps = model.schedule.timesteps
    classes = model.num_classes
    sampler = Sampler(network, model.image_shape, num_classes=classes)
    loop = sampler.loop(clip_x0, explicit_noise=False)
    guided_loop = sampler.loop(clip_x0, explicit_noise=False, guided=True) if classes else None
    inpaint_loop = sampler.loop(clip_x0, explicit_noise=False, inpaint=True)
    guided_inpaint_loop = sampler.loop(clip_x0, explicit_noise=False, guided=True, inpaint=True) if classes else None
    # RePaint's plan is fixed at export: model.inpaint's defaults (250 strides, or T if smaller).
    repaint = repaint_plan(model.schedule, min(REPAINT_STEPS, model.schedule.timesteps), clip_x0=clip_x0)
    ddpm = ddpm_plan(model.schedule, model.variance, clip_x0=clip_x0)
    alphas_cumprod = model.schedule.alphas_cumprod
    abar = tf.constant(alphas_cumprod)

    shape_text = ", ".join(map(str, model.image_shape))

    def image_checks(images, name):
        # Serving does not enforce a signature's shape, only its dtype; a wrong image size
        # would otherwise fail deep inside the network with a message about a reshape.
        return [
            tf.debugging.assert_equal(
                tf.shape(images)[1:], model.image_shape, message=f"{name} must be [B, {shape_text}]"
            )
        ]

    def label_checks(labels, count, name):
        message = f"{name} must be class indices in [0, {classes}] ({classes}: unconditional)"
        return [
            tf.debugging.assert_greater_equal(labels, 0, message=message),
            tf.debugging.assert_less_equal(labels, classes, message=message),
            tf.debugging.assert_equal(tf.size(labels), count, message=f"{name} must hold one class per image"),
        ]

    def denoise(x_t, t, label=None):
        checks = [
            *image_checks(x_t, "x_t"),
            tf.debugging.assert_equal(tf.shape(t), tf.shape(x_t)[:1], message="t must be [B], one per image in x_t"),
            tf.debugging.assert_greater_equal(t, 0, message=f"t must be in [0, {timesteps})"),
            tf.debugging.assert_less(t, timesteps, message=f"t must be in [0, {timesteps})"),
        ]
        conditions = []
        if classes:
            checks += label_checks(label, tf.shape(x_t)[0], "label")
            conditions = [label]
        with tf.control_dependencies(checks):
            return {"eps": tf.cast(network([x_t, t, *conditions], training=False), tf.float32)}

    def plan(sampler_name, steps):
        # "" and 0 stand for kddpm's defaults: TF Serving has no optional inputs.
        sampler_name = tf.where(tf.equal(sampler_name, ""), DEFAULT_SAMPLER, sampler_name)
        is_ddpm = tf.equal(sampler_name, "ddpm")
        is_ddim = tf.equal(sampler_name, "ddim")
        is_dpm = tf.equal(sampler_name, "dpm++2m")
        is_dpm_sde = tf.equal(sampler_name, "dpm++2m_sde")
        asked = steps
        default_steps = tf.where(is_ddim, DEFAULT_STEPS["ddim"], DEFAULT_STEPS["dpm++2m"])
        steps = tf.where(tf.equal(steps, 0), default_steps, steps)
        known = tf.reduce_any(tf.stack([is_ddpm, is_ddim, is_dpm, is_dpm_sde]))
        checks = [
            tf.debugging.Assert(known, ["sampler must be ddpm, ddim, dpm++2m or dpm++2m_sde, got", sampler_name]),
            tf.debugging.Assert(
                tf.logical_or(~is_ddpm, tf.equal(asked, 0) | tf.equal(asked, timesteps)),
                [f"DDPM takes all {timesteps} steps; send steps 0 (or {timesteps}), or sampler ddim or dpm++2m"],
            ),
            tf.debugging.Assert(
                tf.logical_or(~is_ddim, (steps >= 1) & (steps <= timesteps)),
                [f"DDIM steps must be in [1, {timesteps}], got", steps],
            ),
            tf.debugging.Assert(
                tf.logical_or(~(is_dpm | is_dpm_sde), (steps >= 1) & (steps < timesteps)),
                [f"DPM-Solver++ steps must be in [1, {timesteps - 1}], got", steps],
            ),
        ]
        with tf.control_dependencies(checks):

            def stacked(tables):
                plan_timesteps, rows = tables
                return plan_timesteps, tf.cast(tf.stack(rows, axis=1), tf.float32)

            def ddim():
                return stacked(ddim_tables(tf.constant(alphas_cumprod), steps, 0.0, clip_x0))

            def dpm_solver():
                return stacked(dpm_solver_tables(tf.constant(alphas_cumprod), steps, clip_x0, is_dpm_sde))

            return tf.case(
                [
                    (is_ddpm, lambda: (tf.constant(ddpm.timesteps, tf.int32), tf.constant(ddpm.coefficients()))),
                    (is_ddim, ddim),
                ],
                default=dpm_solver,
            )

    def run(x_T, key, plan_timesteps, coefficients, labels=None, guidance_scale=None, known=()):
        stop = tf.shape(plan_timesteps)[0]
        args = (x_T, tf.zeros_like(x_T), key, tf.constant(0), plan_timesteps, coefficients, tf.constant(0), stop)
        args += known
        plain, guided = (inpaint_loop, guided_inpaint_loop) if known else (loop, guided_loop)
        if not classes:
            return {"images": to_uint8_tensor(plain(*args)[0])}
        # Row-format requests send every input once per instance; the first one is used
        # (but for labels: one per image).
        w = guidance_scale[0]
        checks = [
            *label_checks(labels, tf.shape(x_T)[0], "labels"),
            tf.debugging.assert_greater_equal(w, 0.0, message="guidance_scale must be >= 0"),
            tf.debugging.assert_all_finite(w, message="guidance_scale must be finite"),
        ]
        with tf.control_dependencies(checks):
            # w = 0 runs the network once per step on the batch; w > 0 once on the doubled batch.
            x_0 = tf.cond(tf.equal(w, 0.0), lambda: plain(*args, labels, w)[0], lambda: guided(*args, labels, w)[0])
        return {"images": to_uint8_tensor(x_0)}

    def sampled(x_T, seed, sampler_name, steps, *condition):
        return run(x_T, seed_pair(seed[0]), *plan(sampler_name[0], steps[0]), *condition)

    def pixels(images):
        with tf.control_dependencies(image_checks(images, "images")):
            return tf.cast(images, tf.float32) / 127.5 - 1.0

    def img2img(images, strength, seed, sampler_name, steps, *condition):
        # SDEdit as kddpm.editing.img2img runs it: the last round(strength * k) of the sampler's
        # k timesteps (DDPM: from index round(strength * T) - 1), the rows rebuilt from there.
        x0, strength, name = pixels(images), strength[0], sampler_name[0]
        name = tf.where(tf.equal(name, ""), DEFAULT_SAMPLER, name)
        plan_timesteps, coefficients = plan(name, steps[0])
        count = tf.shape(plan_timesteps)[0]
        is_ddpm = tf.equal(name, "ddpm")
        runs = tf.where(
            is_ddpm,
            tf.cast(tf.round(strength * timesteps), tf.int32),
            tf.cast(tf.round(strength * tf.cast(count, tf.float32)), tf.int32),
        )
        checks = [
            tf.debugging.Assert((strength > 0.0) & (strength <= 1.0), ["strength must be in (0, 1], got", strength]),
            tf.debugging.Assert(runs >= 1, ["strength runs none of the sampler's steps; raise strength or steps"]),
        ]
        with tf.control_dependencies(checks):
            first = count - runs
        start_timesteps = plan_timesteps[first:]

        def ddim():
            return tf.cast(tf.stack(ddim_rows(abar, start_timesteps, 0.0, clip_x0), axis=1), tf.float32)

        def dpm_solver():
            rows = dpm_solver_rows(abar, start_timesteps, tf.equal(name, "dpm++2m_sde"))
            return tf.cast(tf.stack(rows, axis=1), tf.float32)

        start_coefficients = tf.case(
            [(is_ddpm, lambda: coefficients[first:]), (tf.equal(name, "ddim"), ddim)], default=dpm_solver
        )
        key = seed_pair(seed[0])
        batch = tf.shape(x0)[0]
        noise = initial_noise(key, 0, batch, model.image_shape)
        x_t = model.schedule.q_sample(x0, tf.fill([batch], start_timesteps[0]), noise)
        return run(x_t, key, start_timesteps, start_coefficients, *condition)

    def inpaint(images, mask, seed, *condition):
        known = pixels(images)
        checks = [
            tf.debugging.assert_equal(
                tf.shape(mask), tf.shape(images)[:3], message=f"mask must be [B, {height}, {width}], one per image"
            ),
            tf.debugging.Assert(
                tf.reduce_all((tf.equal(mask, 0.0)) | tf.equal(mask, 1.0)), ["mask must be 0 (keep) or 1 (fill)"]
            ),
        ]
        with tf.control_dependencies(checks):
            keep = (1.0 - mask)[..., None]
        key = seed_pair(seed[0])
        x_T = initial_noise(key, 0, tf.shape(known)[0], model.image_shape)
        edits = (known, keep, tf.constant(repaint.known_rows, tf.float32))
        repaint_timesteps = tf.constant(repaint.timesteps, tf.int32)
        return run(x_T, key, repaint_timesteps, tf.constant(repaint.coefficients()), *condition, known=edits)

    def sample(num_images, seed, sampler, steps, *condition):
        count = num_images[0]
        with tf.control_dependencies([tf.debugging.assert_positive(count, message="num_images must be >= 1")]):
            x_T = initial_noise(seed_pair(seed[0]), 0, count, model.image_shape)
        return sampled(x_T, seed, sampler, steps, *condition)

    def sample_from_noise(x_T, seed, sampler, steps, *condition):
        with tf.control_dependencies(image_checks(x_T, "x_T")):
            return sampled(tf.identity(x_T), seed, sampler, steps, *condition)

    def class_names(index):
        return {"names": tf.constant(model.class_names or [str(c) for c in range(classes)])}

    image = tf.TensorSpec([None, height, width, channels], tf.float32, name="x_t")
    options = [
        tf.TensorSpec([None], tf.int64, name="seed"),
        tf.TensorSpec([None], tf.string, name="sampler"),
        tf.TensorSpec([None], tf.int32, name="steps"),
    ]
    denoise_inputs = [image, tf.TensorSpec([None], tf.int32, name="t")]
    if classes:
        denoise_inputs.append(tf.TensorSpec([None], tf.int32, name="label"))
        options += [
            tf.TensorSpec([None], tf.int32, name="labels"),
            tf.TensorSpec([None], tf.float32, name="guidance_scale"),
        ]
    edit_options = options[:1] + options[3:]  # seed[, labels, guidance_scale]
    pixel_images = tf.TensorSpec([None, height, width, channels], tf.uint8, name="images")
    archive = keras.export.ExportArchive()
    archive.track(network)
    archive.add_endpoint("serving_default", denoise, denoise_inputs)
    archive.add_endpoint("sample", sample, [tf.TensorSpec([None], tf.int32, name="num_images"), *options])
    archive.add_endpoint(
        "sample_from_noise",
        sample_from_noise,
        [tf.TensorSpec([None, height, width, channels], tf.float32, name="x_T"), *options],
    )
    archive.add_endpoint(
        "img2img", img2img, [pixel_images, tf.TensorSpec([None], tf.float32, name="strength"), *options]
    )
    archive.add_endpoint(
        "inpaint", inpaint, [pixel_images, tf.TensorSpec([None, height, width], tf.float32, name="mask"), *edit_options]
    )
    if classes:
        # The class names, so that a client can ask for classes by name (the input is ignored).
        archive.add_endpoint("class_names", class_names, [tf.TensorSpec([None], tf.int32, name="index")])
    return archive
