"""Align Your Steps (Sabour, Fidler & Kreis 2024): the published 10-step noise levels.

NVIDIA's "Align Your Steps" optimises the sampling schedule per model; these are the sigmas (k-diffusion
units, 11 values for 10 steps, the last the model's smallest noise level) published for Stable Diffusion 1.5,
SDXL and Stable Video Diffusion, as ComfyUI's ``AlignYourStepsScheduler`` ships them. Other step counts
interpolate them log-linearly (:func:`diffusion_fast.schedules.align_your_steps`). Data only: this module
imports nothing.
"""

NOISE_LEVELS: dict[str, tuple[float, ...]] = {
    "sd15": (14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092, 0.9642583904,
             0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582),
    "sdxl": (14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141, 0.5550693289,
             0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582),
    "svd": (700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002),
}
