"""The sampling choices kddpm makes wherever the user makes none, in one place (no TensorFlow here,
so that the command line can build its help from them without loading it).

The figures behind each choice are in docs/samplers.md and docs/conditional.md.
"""

SAMPLERS = ("ddpm", "ddim", "dpm++2m", "dpm++2m_sde")
VARIANCES = ("beta_tilde", "beta")
# model.sample, trajectories, training grids, kddpm sample and evaluate, the SavedModel's sample
# signatures and both deployment clients: the best FID per network call of the quality-per-call
# figures, at its default steps, with the model's clipping.
DEFAULT_SAMPLER = "dpm++2m"
# Steps of the samplers that take a step count (DDPM always takes all T).
DEFAULT_STEPS = {"ddim": 50, "dpm++2m": 20, "dpm++2m_sde": 20}
# Classifier-free guidance scale w for class-conditional models, wherever labels are given without one.
DEFAULT_GUIDANCE = 1.0
# RePaint inpainting: reverse strides over T, and every JUMP_LENGTH-th stride JUMP_N_SAMPLE - 1
# jumps back up (Lugmayr et al. 2022's settings, as diffusers' RePaint pipeline defaults them).
REPAINT_STEPS = 250
REPAINT_JUMP_LENGTH = 10
REPAINT_JUMP_N_SAMPLE = 10
# clip_x0: off, clip the predicted x0 to [-1, 1], or dynamic thresholding (Saharia et al. 2022).
CLIP_MODES = (False, True, "dynamic")
# Dynamic thresholding's quantile of |x0_hat| per image (diffusers' dynamic_thresholding_ratio).
DYNAMIC_THRESHOLD_QUANTILE = 0.995


def clip_name(clip_x0) -> str:
    """A clip_x0 mode as a word for messages and metadata: 'on', 'off' or 'dynamic'."""
    return "dynamic" if clip_x0 == "dynamic" else ("on" if clip_x0 else "off")
