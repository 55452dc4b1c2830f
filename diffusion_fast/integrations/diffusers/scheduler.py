"""A diffusers scheduler backed by diffusion_fast's samplers: :class:`Scheduler`.

``pipe.scheduler = Scheduler.from_config(pipe.scheduler)`` gives a pipeline the latents its stock scheduler
gives (to float32 rounding), with each ``step`` one fused :func:`diffusion_fast.ops.sampler_step` launch that
never reads a device value. ``Scheduler.from_config(pipe.scheduler, sampler="dpmpp_2m")`` switches the method
the way ``DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)`` does in diffusers.

How it is built:

* The schedule (sigmas, timesteps, ``init_noise_sigma``) is :func:`diffusion_fast.schedules.from_diffusers_config`
  with the rules of the diffusers class that implements the sampler's method (:data:`METHODS`); for
  flow-matching configs those of ``FlowMatchEulerDiscreteScheduler`` whatever the sampler.
* The update is the sampler's coefficient table (:func:`diffusion_fast.samplers.build_plan`): one row per
  network evaluation, which is one ``step`` call in diffusers' layout (Heun and KDPM2 interleave two per step).
* The latents keep the convention of that diffusers class (variance-exploding for the Euler family, unit
  variance for DDIM / DPM-Solver / UniPC, the flow state for flow matching), so callbacks, img2img and
  ``add_noise`` see what they see with the stock scheduler. The sampler integrates the variance-exploding state
  ``x = latents * sqrt(sigma^2 + 1)``; a row is linear in its input, so the rescale in and out folds into the
  row's coefficients and a step stays one launch.

Known differences from diffusers that cannot be matched (each measured in tests/test_diffusers_scheduler.py):

* ``dpmpp_3m_sde`` with ``eta > 0`` ↔ ``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++",
  solver_order=3)``: diffusers' third-order SDE update weights its second divided difference by
  ``(1 - e^{-2h} - 2h) / (2h)^2 - 0.5`` where k-diffusion (and this sampler) use
  ``-((e^{-2h} - 1 + 2h) / (2h)^2 - 0.5)``: the ``0.5`` has the opposite sign, so diffusers' term does not
  vanish as ``h -> 0``. From the third step on the two differ: 0.13 relative on the tiny SD1.5 pipeline's final
  latents after 6 steps, 0.23 after 16 (``python tests/test_diffusers_scheduler.py``); with diffusers' sign
  corrected the two agree to float32 rounding (tested). A warning says so when such a scheduler is built. With
  ``eta=0`` (``algorithm_type="dpmsolver++"``, ``solver_type="heun"``) the two agree.

Where ``step`` matches diffusers but ``sampling_args`` (one sigma sequence for ``diffusion_fast.sample``) cannot,
``sampling_args`` raises and says why (DDIM steps that land between the listed timesteps, LMS img2img, DPM-Solver's
lower-order final steps above sigma 0, UniPC's corrector on a zero-length final step, DDIM's infinite first sigma
with ``rescale_betas_zero_snr``).
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ...ops import sampler_step
from ...ops.rows import AD, AH, AX, AZ, BD, BH, BX, P
from ...samplers.tables import OPTIONS, SAMPLERS, Plan, build_plan, with_denoised_slot
from ...schedules import Schedule, from_diffusers_config
from ...schedules.diffusers_config import _sigma_to_t_numpy

# --------------------------------------------------------------------------------------------------------
# Which diffusers class implements each sampler's method
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """How a sampler lines up with a diffusers scheduler class.

    Attributes:
        cls: the diffusers class whose ``set_timesteps`` rules (spacing, offsets, final sigma) and ``step``
            layout this sampler follows for DDPM-style (beta) configs.
        order: ``scheduler.order`` of that class: network evaluations per step in its layout.
        noise: the dtype the class draws its per-step noise in: "model" (``model_output``'s), "float32", or
            None for a deterministic method. Stochastic classes draw once per ``step`` call, the last included.
        returns_x0: whether the class's ``step`` returns ``pred_original_sample`` too.
    """

    cls: str
    order: int = 1
    noise: str | None = None
    returns_x0: bool = True


# One row per sampler; a sampler added to diffusion_fast.samplers gets a diffusers counterpart by a row here
# (and, if the class is new, its timestep rules in diffusion_fast.schedules.diffusers_config).
METHODS: dict[str, Method] = {
    "euler": Method("EulerDiscreteScheduler"),
    "euler_ancestral": Method("EulerAncestralDiscreteScheduler", noise="model"),
    "heun": Method("HeunDiscreteScheduler", order=2),
    "dpm_2": Method("KDPM2DiscreteScheduler", order=2),
    "lms": Method("LMSDiscreteScheduler"),
    "ddim": Method("DDIMScheduler", noise="model"),
    "dpmpp_2m": Method("DPMSolverMultistepScheduler", returns_x0=False),
    "dpmpp_2m_sde": Method("DPMSolverMultistepScheduler", noise="float32", returns_x0=False),
    "dpmpp_3m_sde": Method("DPMSolverMultistepScheduler", noise="float32", returns_x0=False),
    "unipc": Method("UniPCMultistepScheduler", returns_x0=False),
}

_FLOW_CLASSES = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
_FLOW_RULES = "FlowMatchEulerDiscreteScheduler"
_SIMPLE_DEFAULTS = {m.cls: s for s, m in METHODS.items() if m.cls != "DPMSolverMultistepScheduler"}
_OUR_KEYS = ("schedule_class", "sampler", "sampler_options")


def _default_sampler(cls: str | None, cfg: Mapping) -> tuple[str, dict]:
    """The sampler (and options) implementing the method of diffusers class ``cls`` configured by ``cfg``."""
    if cls in _FLOW_CLASSES:
        return ("heun" if cls == "FlowMatchHeunDiscreteScheduler" else "euler"), {}
    if cls == "DPMSolverMultistepScheduler":
        alg, order = cfg.get("algorithm_type", "dpmsolver++"), cfg.get("solver_order", 2)
        solver_type = cfg.get("solver_type", "midpoint")
        where = (f"DPMSolverMultistepScheduler(algorithm_type={alg!r}, solver_order={order}, "
                 f"solver_type={solver_type!r})")
        if alg not in ("dpmsolver++", "sde-dpmsolver++"):
            raise ValueError(f"{where}: the noise-prediction DPM-Solver has no sampler here (only the data-prediction "
                             "dpmsolver++ / sde-dpmsolver++ ones); pass sampler=, e.g. sampler='dpmpp_2m'")
        eta = 0.0 if alg == "dpmsolver++" else 1.0
        if order == 2:
            if alg == "dpmsolver++" and solver_type == "midpoint":
                return "dpmpp_2m", {}
            return "dpmpp_2m_sde", {"eta": eta, "solver_type": solver_type}
        if order == 3 and solver_type == "heun":
            return "dpmpp_3m_sde", {"eta": eta}
        if order == 3:
            raise ValueError(f"{where}: its second-order start-up steps use the midpoint form; dpmpp_3m_sde uses "
                             "the heun form (as k-diffusion); pass sampler='dpmpp_3m_sde' to sample with "
                             "solver_type='heun' rules")
        raise ValueError(f"{where}: no sampler here takes first-order DPM-Solver++ steps with these rules; pass "
                         "sampler=, e.g. 'ddim' (the same update, DDIM's timestep rules) or 'dpmpp_2m'")
    if cls == "UniPCMultistepScheduler":
        return "unipc", {"order": cfg.get("solver_order", 2), "variant": cfg.get("solver_type", "bh2")}
    if cls in _SIMPLE_DEFAULTS:
        return _SIMPLE_DEFAULTS[cls], {}
    choices = ", ".join(sorted(METHODS))
    if not cls:
        raise ValueError("a config without '_class_name' (a live scheduler's .config carries none) names no method: "
                         "pass the scheduler object itself (Scheduler.from_config(pipe.scheduler)) or sampler=, one "
                         f"of {choices}")
    raise ValueError(f"{cls} has no matching sampler here; its noise schedule (betas, steps_offset, prediction_type, "
                     f"...) is used as is: pass sampler=, one of {choices}")


def _forced_keys(sampler: str, options: Mapping) -> dict:
    """Config keys of the diffusers class that select the sampler's method (set from its options)."""
    if sampler == "dpmpp_2m":
        return {"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint"}
    if sampler in ("dpmpp_2m_sde", "dpmpp_3m_sde"):
        alg = "sde-dpmsolver++" if float(options.get("eta", 1.0)) > 0 else "dpmsolver++"
        solver_type = options.get("solver_type", "midpoint") if sampler == "dpmpp_2m_sde" else "heun"
        order = 2 if sampler == "dpmpp_2m_sde" else 3
        return {"algorithm_type": alg, "solver_order": order, "solver_type": solver_type}
    if sampler == "unipc":
        return {"solver_order": int(options.get("order", 2)), "solver_type": options.get("variant", "bh2")}
    return {}


def _class_defaults(cls: str) -> dict:
    import diffusers

    klass = getattr(diffusers, cls, None)
    if klass is None:
        return {}
    params = inspect.signature(klass.__init__).parameters
    return {k: p.default for k, p in params.items() if k not in ("self", "kwargs")
            and p.kind is p.POSITIONAL_OR_KEYWORD and p.default is not p.empty}


def _convert(cfg: Mapping, target: str) -> tuple[dict, set]:
    """``cfg`` as ``target.from_config(cfg).config`` holds it: keys the source filled with its defaults give way to
    the target's defaults; keys the target does not take stay (pipelines read some, e.g. ``base_shift``).
    Returns the config and the keys that hold the target's defaults."""
    defaults = set(cfg.get("_use_default_values") or ())
    given = {k: v for k, v in cfg.items() if not k.startswith("_") and k not in defaults and k not in _OUR_KEYS}
    out = _class_defaults(target)
    filled = set(out) - set(given)
    out.update(given)
    return out, filled


_DDIM, _DPM, _UNIPC, _HEUN = "DDIMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler", \
    "HeunDiscreteScheduler"

# Config settings whose effect the fused step cannot reproduce: (key, classes, supported value, why).
_UNSUPPORTED = [
    ("thresholding", (_DDIM, _DPM, _UNIPC), False,
     "dynamic thresholding clamps the predicted x0 every step; the fused step is linear"),
    ("clip_sample", (_DDIM, _HEUN), False,
     "it clamps the predicted x0 to ±clip_sample_range every step; the fused step is linear (DDIMScheduler's "
     "default is True, so DDIMScheduler.from_config gives it for configs without the key: pass the config with "
     "clip_sample=False, what latent diffusion models use)"),
    ("variance_type", (_DPM,), None, "learned variances need the model's extra output channels"),
    ("stochastic_sampling", (_FLOW_RULES,), False,
     "FlowMatchEuler's stochastic sampling re-noises x0 every step; no sampler here does that"),
    ("predict_x0", (_UNIPC,), True, "UniPC's noise-prediction form is not implemented (the sampler predicts data)"),
    ("solver_p", (_UNIPC,), None, "UniPC with a separate predictor scheduler is not implemented"),
    ("disable_corrector", (_UNIPC,), [], "UniPC without its corrector on some steps is not implemented"),
    ("lower_order_final", (_UNIPC,), True,
     "UniPC keeps its full order on the last steps then, which diverges on the step to sigma 0"),
]


def _check_supported(cfg: Mapping, schedule_class: str) -> None:
    for key, classes, ok, why in _UNSUPPORTED:
        if schedule_class not in classes or key not in cfg:
            continue
        value = cfg[key]
        if not (value == ok or (not value and not ok and ok is not True)):
            raise ValueError(f"config[{key!r}] = {value!r} is not supported with {schedule_class}'s rules "
                             f"(supported: {ok!r}): {why}")


# --------------------------------------------------------------------------------------------------------
# Step output
# --------------------------------------------------------------------------------------------------------


@dataclass
class SchedulerStepOutput(BaseOutput):
    """``prev_sample`` (the latents for the next step) and, for the classes whose ``step`` returns it,
    ``pred_original_sample`` (this step's denoised estimate, a tensor of its own)."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


@dataclass
class _Layout:
    """The stock class's steps: boundaries and timesteps, before Heun / KDPM2 interleave them."""

    sigmas: np.ndarray        # [n + 1] float64; the last is where the final step lands (it repeats the one
    #                           before when that step has length zero, as diffusers' sigma_min ending can)
    timesteps: torch.Tensor   # [n] the stock timestep of each step
    zero_length_final: bool


@dataclass
class _Rows:
    """The step rows of one run: device tables plus the host facts the loop needs."""

    coef: torch.Tensor          # [E, width] float32 on the device, the latents' rescale folded in
    slots: torch.Tensor         # [E, 2] int64
    K: int
    noisy: np.ndarray           # [E] bool: the row uses noise
    slot_d: np.ndarray          # [E] where the row writes its denoised estimate
    first: int                  # stock step index of row 0
    eta: float | None
    device: torch.device


class Scheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler (``SchedulerMixin`` + ``ConfigMixin``) whose steps run diffusion_fast's samplers.

    Build it with :meth:`from_config` from a stock scheduler, its config, or a saved config of this class.
    A pipeline then calls ``set_timesteps``, ``scale_model_input``, ``step``, ``add_noise`` /
    ``scale_noise`` and ``set_begin_index`` as with its own scheduler, and gets the same latents as with the
    diffusers class implementing the same method (:data:`METHODS`), to float32 rounding.

    The config holds the source config's keys (as ``Cls.from_config(source).config`` would: pipelines read some,
    e.g. Flux's ``base_shift``), plus ``schedule_class`` (the diffusers class whose rules are followed),
    ``sampler`` and ``sampler_options``; ``save_pretrained`` / ``from_pretrained`` round-trip it.

    For the fused loop (``diffusion_fast.sample``): :meth:`sampling_args`, :meth:`model_timestep`,
    :meth:`latents_to_state` and :meth:`state_to_latents`.
    """

    _compatibles: list = []
    order = 1

    def __init__(self, schedule_class: str, sampler: str, sampler_options: dict | None = None, **config: Any):
        options = dict(sampler_options or {})
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}; got {sampler!r}")
        if sampler not in METHODS:
            raise ValueError(f"sampler {sampler!r} has no diffusers counterpart here yet (the table "
                             "diffusion_fast.integrations.diffusers.scheduler.METHODS); one of "
                             f"{', '.join(sorted(METHODS))}")
        flow = schedule_class == _FLOW_RULES
        if not flow and schedule_class != METHODS[sampler].cls:
            raise ValueError(f"schedule_class = {schedule_class!r} does not implement sampler {sampler!r} "
                             f"(that is {METHODS[sampler].cls}, or {_FLOW_RULES} for flow-matching configs)")
        _check_supported(config, schedule_class)
        self.register_to_config(schedule_class=schedule_class, sampler=sampler, sampler_options=options, **config)
        self._method = METHODS[sampler]
        self._flow = flow
        self.order = self._method.order
        self._options = {**OPTIONS[sampler], **options}
        self._schedule_config = dict(config)
        self._schedule: Schedule | None = None
        self._layout: _Layout | None = None
        self._device: torch.device | None = None
        self._row_cache: dict = {}
        self.timesteps = None
        self.sigmas = None
        self.num_inference_steps = None
        self._reset()
        # Check the config and the options now rather than at the first set_timesteps.
        trial = self._build_schedule(min(10, len(self)), mu=0.5 if config.get("use_dynamic_shifting") else None)
        if trial.prediction_type == "flow" and trial.parametrization != "flow":
            raise ValueError(f"config['prediction_type'] = {config.get('prediction_type')!r} (a flow velocity) needs "
                             f"flow sigmas, which {schedule_class}'s rules give only with use_flow_sigmas=True "
                             "(DPMSolverMultistep, UniPC); FlowMatchEuler configs always have them")
        if trial.parametrization == "flow" and trial.prediction_type in ("epsilon", "v_prediction"):
            raise ValueError(f"config['use_flow_sigmas'] = True needs prediction_type='flow_prediction', got "
                             f"{config.get('prediction_type', 'epsilon')!r}")
        build_plan(sampler, trial.sigmas.numpy(), prediction=trial.prediction_type,
                   parametrization=trial.parametrization, **options)
        if sampler == "dpmpp_3m_sde" and float(self._options["eta"]) > 0 and not flow:
            warnings.warn("dpmpp_3m_sde with eta > 0 differs from DPMSolverMultistepScheduler(algorithm_type="
                          "'sde-dpmsolver++', solver_order=3) from its third step on: diffusers' third-order SDE "
                          "update has the opposite sign on the 0.5 in its second-difference weight; this sampler "
                          "uses k-diffusion's form (see diffusion_fast.integrations.diffusers.scheduler)",
                          stacklevel=3)

    # ---------------------------------------------------------------------------------------- building

    @classmethod
    def from_config(cls, config: Any = None, sampler: str | None = None, return_unused_kwargs: bool = False,
                    **sampler_options: Any):
        """Build a scheduler from a diffusers scheduler, its config dict, or a config saved by this class.

        Args:
            config: ``pipe.scheduler`` (any diffusers scheduler), its ``.config``, a ``scheduler_config.json``
                dict, or this class's own config. A dict without ``_class_name`` (a live scheduler's
                ``.config``) needs ``sampler=``.
            sampler: one of :data:`METHODS`' samplers. Default: the one implementing the source class's method
                (e.g. ``dpmpp_2m`` for a DPMSolverMultistepScheduler config with ``solver_order=2``); a class
                without one (PNDMScheduler, DDPMScheduler, ...) needs ``sampler=``. The timestep rules are then
                those of the class implementing ``sampler``, the source config converted as diffusers'
                ``Cls.from_config`` converts it; flow-matching configs keep FlowMatchEuler's rules for any
                sampler (run in the flow parametrization).
            return_unused_kwargs: as diffusers' ``from_config`` (nothing is ever unused).
            **sampler_options: the sampler's options (``eta``, ``s_noise``, ``order``, ``solver_type``,
                ``variant``); the defaults come from the class config (e.g. UniPC's ``solver_order``).

        Raises:
            ValueError: a class or config option without a matching sampler, an unknown sampler or option, a
                config setting the fused step cannot reproduce (the message names the key and what to pass).
        """
        if config is None:
            raise ValueError("config is required: a diffusers scheduler, its config dict, or this class's config")
        if isinstance(config, Mapping):
            cfg, source = dict(config), config.get("_class_name")
        elif isinstance(getattr(config, "config", None), Mapping):
            cfg, source = dict(config.config), type(config).__name__
        else:
            raise TypeError(f"config must be a diffusers scheduler or a config dict, got {type(config).__name__}")
        ours = all(k in cfg for k in _OUR_KEYS)
        if ours:
            source = cfg["schedule_class"]
            if sampler is None or sampler == cfg["sampler"]:
                sampler, sampler_options = cfg["sampler"], {**cfg["sampler_options"], **sampler_options}
            cfg = {k: v for k, v in cfg.items() if k not in _OUR_KEYS}
        flow = source in _FLOW_CLASSES
        if sampler is None:
            sampler, derived = _default_sampler(source, _convert(cfg, source)[0] if source else cfg)
            sampler_options = {**derived, **sampler_options}
        elif sampler not in METHODS:
            raise ValueError(f"sampler must be one of {', '.join(sorted(METHODS))}; got {sampler!r}")
        target = _FLOW_RULES if flow else METHODS[sampler].cls
        effective, filled = _convert(cfg, target)
        if target == _UNIPC:  # UniPC's own mapping of DPM-Solver's solver types
            if effective.get("solver_type") in ("midpoint", "heun", "logrho"):
                effective["solver_type"] = "bh2"
            sampler_options = {"order": effective.get("solver_order", 2),
                               "variant": effective.get("solver_type", "bh2"), **sampler_options}
        if target == _DPM and sampler == "dpmpp_2m_sde" and "solver_type" not in sampler_options \
                and effective.get("solver_type") in ("midpoint", "heun"):
            sampler_options = {**sampler_options, "solver_type": effective["solver_type"]}
        if not flow:
            forced = _forced_keys(sampler, {**OPTIONS[sampler], **sampler_options})
            effective.update(forced)
            filled -= set(forced)
        # As diffusers' own configs, the keys holding class defaults are listed, so that converting this config to
        # another class gives that class's defaults there (saving drops the list, as diffusers does).
        scheduler = cls(schedule_class=target, sampler=sampler, sampler_options=sampler_options,
                        _use_default_values=sorted(filled), **effective)
        return (scheduler, {}) if return_unused_kwargs else scheduler

    def _build_schedule(self, steps: int | None, *, mu: float | None = None, timesteps: Any = None,
                        sigmas: Any = None, overrides: Mapping | None = None) -> Schedule:
        rules = self.config.schedule_class
        cfg = self._schedule_config if not overrides else {**self._schedule_config, **overrides}
        if mu is not None and not cfg.get("use_dynamic_shifting") and rules in (_FLOW_RULES, _UNIPC):
            mu = None  # these classes take mu and use it only with use_dynamic_shifting
        return from_diffusers_config(cfg, steps, class_name=rules, mu=mu, timesteps=timesteps, sigmas=sigmas)

    # ------------------------------------------------------------------------------------- diffusers API

    @property
    def sampler(self) -> str:
        """The diffusion_fast sampler this scheduler runs."""
        return self.config.sampler

    @property
    def schedule(self) -> Schedule | None:
        """The :class:`~diffusion_fast.schedules.Schedule` of the last ``set_timesteps`` (None before)."""
        return self._schedule

    @property
    def step_index(self) -> int | None:
        """The stock step index of the next ``step`` call (None before the first)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """The first step index, set by img2img pipelines with :meth:`set_begin_index`."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the next run at step index ``begin_index`` (a multiple of ``order``), as diffusers' schedulers."""
        if isinstance(begin_index, bool) or not isinstance(begin_index, (int, np.integer)) or begin_index < 0:
            raise ValueError(f"begin_index must be an int >= 0, got {begin_index!r}")
        if begin_index % self.order:
            raise ValueError(f"begin_index must be a multiple of order={self.order} (the start of a step), "
                             f"got {begin_index}")
        self._begin_index = int(begin_index)
        if self._schedule is not None and self._device is not None:
            self._prepare_rows(self._begin_index, self._step_eta(None), self._device)  # upload before the loop

    @property
    def init_noise_sigma(self) -> float | torch.Tensor:
        """The standard deviation of the starting latents, as the diffusers class gives it."""
        if self._schedule is None or self._schedule.latent_space != "ve":
            return 1.0
        return torch.tensor(self._schedule.init_noise_sigma, dtype=torch.float32)

    def __len__(self) -> int:
        return int(self.config.get("num_train_timesteps", 1000))

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: Any = None, sigmas: Any = None, mu: float | None = None) -> None:
        """Compute the schedule as the diffusers class implementing the sampler does.

        Args:
            num_inference_steps: number of steps (omit it with custom ``timesteps`` / ``sigmas``).
            device: where ``timesteps`` (and the device tables) go.
            timesteps: custom timesteps, where the diffusers class takes them (Euler, Heun, DPM-Solver,
                FlowMatchEuler).
            sigmas: custom sigmas, where the diffusers class takes them (Euler, UniPC with flow sigmas,
                FlowMatchEuler, which shifts them as it shifts its own; Flux passes them with ``mu``).
            mu: the dynamic-shift exponent (Flux / SD3 with ``use_dynamic_shifting``).
        """
        rules = self.config.schedule_class
        cfg = self._schedule_config
        custom = timesteps is not None or sigmas is not None
        if num_inference_steps is not None and not custom and not self._flow \
                and cfg.get("timestep_spacing") == "trailing" and cfg.get("lambda_min_clipped") in (None, -math.inf):
            T = len(self)
            if isinstance(num_inference_steps, int) and num_inference_steps > 0 \
                    and len(np.arange(T, 0, -T / num_inference_steps)) != num_inference_steps:
                raise ValueError(f"num_inference_steps = {num_inference_steps} with 'trailing' spacing: diffusers' "
                                 f"{rules} makes {num_inference_steps + 1} timesteps here (the last is -1, outside "
                                 "the training range); choose another step count")
        schedule = self._build_schedule(num_inference_steps, mu=mu, timesteps=timesteps, sigmas=sigmas)
        layout = _Layout(schedule.sigmas.numpy().copy(), schedule.timesteps, False)
        if schedule.final_sigma > 0 and not custom:
            # from_diffusers_config leaves out a final step of length zero; diffusers takes it (the network is
            # evaluated; the sample stays, except for UniPC's corrector): keep it in the step layout.
            zero = self._build_schedule(num_inference_steps, mu=mu,
                                        overrides={"final_sigmas_type": "zero", "set_alpha_to_one": True})
            if zero.steps == schedule.steps + 1:
                s = zero.sigmas.numpy()
                layout = _Layout(np.append(s[:-1], s[-2]), zero.timesteps, True)
        self._schedule, self._layout = schedule, layout
        self.num_inference_steps = len(layout.timesteps) if num_inference_steps is None else num_inference_steps
        plan = self._plan(layout.sigmas, self._options)
        self._eval_sigmas = plan.sigma_eval.copy()
        ts = self._stock_timesteps(layout, plan)
        self._timesteps_host = ts.numpy()
        self.timesteps = ts.to(device) if device is not None else ts
        self.sigmas = self._stock_sigmas(layout.sigmas)
        self._row_sigma32 = torch.as_tensor(self._eval_sigmas, dtype=torch.float32)
        self._t_tables = {}
        self._row_cache = {}
        self._reset()
        self._device = None if device is None else torch.device(device)
        if self._device is not None:  # the device tables go up now, not inside the denoising loop
            self._timestep_table(self._device)
            schedule.sigma_to_timestep(torch.ones(1, device=self._device))  # caches its log-sigma table there
            self._prepare_rows(0, self._step_eta(None), self._device)

    def _reset(self) -> None:
        self._step_index = None
        self._begin_index = None
        self._hist = None
        self._rows = None

    def _stock_timesteps(self, layout: _Layout, plan) -> torch.Tensor:
        ts = layout.timesteps
        if self.order == 1:
            return ts.clone()
        out = []
        for e in range(plan.evaluations):
            i = int(plan.step[e])
            if plan.sigma_eval[e] == layout.sigmas[i]:
                out.append(ts[i].item())
            elif plan.sigma_eval[e] == layout.sigmas[i + 1]:  # Heun's second stage, at the next sigma
                out.append(ts[i + 1].item())
            else:  # KDPM2's midpoint, mapped as KDPM2 maps it (float32, from float32 log sigmas)
                out.append(self._midpoint_timestep(layout.sigmas[i: i + 2]))
        return torch.tensor(out, dtype=ts.dtype)

    def _midpoint_timestep(self, pair: np.ndarray) -> float:
        s = torch.tensor(pair, dtype=torch.float32)
        mid = s.log().lerp(s.flip(0).log(), 0.5).exp()[1]
        schedule = self._schedule
        if schedule.timestep_type == "flow":
            return float(mid * schedule.num_train_timesteps)
        log_table = np.log(schedule.train_sigmas.numpy().astype(np.float32))
        return float(_sigma_to_t_numpy(mid.numpy().reshape(1), log_table)[0])

    def _stock_sigmas(self, boundaries: np.ndarray) -> torch.Tensor:
        s = torch.as_tensor(boundaries, dtype=torch.float32)
        if self.sampler == "heun":  # [s0, s1, s1, ..., s_{n-1}, s_{n-1}, 0], as HeunDiscrete
            return torch.cat([s[:1], s[1:-1].repeat_interleave(2), s[-1:]])
        if self.sampler == "dpm_2":  # [s0, s1, s1, ..., 0, 0, 0], as KDPM2Discrete
            return torch.cat([s[:1], s[1:].repeat_interleave(2), s[-1:]])
        return s

    # ------------------------------------------------------------------------------------------- indices

    def index_for_timestep(self, timestep: Any, schedule_timesteps: torch.Tensor | None = None) -> int:
        """The step index of ``timestep``, by diffusers' rule (the second match when it occurs twice).

        A timestep taken from ``self.timesteps`` (as pipelines pass them) is located by its address, with no
        device read; any other value is compared on the host (one device read for a device tensor, as in
        diffusers).
        """
        self._require_schedule("index_for_timestep")
        host = self._timesteps_host if schedule_timesteps is None else schedule_timesteps.detach().cpu().numpy()
        value = None
        if schedule_timesteps is None and isinstance(timestep, torch.Tensor) and timestep.numel() == 1 \
                and timestep.device == self.timesteps.device and self.timesteps.is_contiguous() \
                and timestep.untyped_storage().data_ptr() == self.timesteps.untyped_storage().data_ptr():
            pos = (timestep.data_ptr() - self.timesteps.data_ptr()) // timestep.element_size()
            if 0 <= pos < host.shape[0]:
                value = host[pos]
        if value is None:
            value = timestep.item() if isinstance(timestep, torch.Tensor) else timestep
        matches = np.nonzero(host == value)[0]
        if matches.shape[0] == 0:
            raise ValueError(f"timestep {value!r} is not one of scheduler.timesteps ({host.tolist()})")
        return int(matches[1] if matches.shape[0] > 1 else matches[0])

    def _init_step_index(self, timestep: Any) -> None:
        self._step_index = self._begin_index if self._begin_index is not None else self.index_for_timestep(timestep)

    def _require_schedule(self, what: str) -> Schedule:
        if self._schedule is None:
            raise ValueError(f"{what} needs the schedule: call set_timesteps first")
        return self._schedule

    # ---------------------------------------------------------------------------------------------- rows

    def _plan(self, sigmas: np.ndarray, opts: Mapping):
        """The sampler's table over ``sigmas`` (step boundaries), with diffusers' zero-length final step kept:
        the network is evaluated there, the sample stays (UniPC still applies its corrector)."""
        schedule = self._schedule
        kw = dict(prediction=schedule.prediction_type, parametrization=schedule.parametrization)
        if not self._layout.zero_length_final:
            return build_plan(self.sampler, sigmas, **kw, **opts)
        zero = np.asarray(sigmas, dtype=np.float64).copy()
        zero[-1] = 0.0
        plan = build_plan(self.sampler, zero, **kw, **opts)
        coef = plan.coef.copy()
        last = coef[-1]
        width = (coef.shape[1] - AH) // 2
        a_cols = [AX, AD] + list(range(AH, AH + width))
        if self.sampler == "unipc":  # the corrected state (the row's y) is where the step stays
            b_cols = [BX, BD] + list(range(BH(width), BH(width) + width))
            last[a_cols] = last[b_cols]
        else:
            last[a_cols] = 0.0
            last[AX] = 1.0
        last[AZ] = 0.0
        return replace(plan, coef=coef, noise=coef[:, AZ] != 0.0, sigmas=np.asarray(sigmas, dtype=np.float64))

    def _host_rows(self, begin: int, eta: float | None) -> tuple[np.ndarray, np.ndarray, int]:
        """Coefficient rows (float64, rescales folded in) of a run starting at stock step index ``begin``."""
        layout = self._layout
        s = layout.sigmas
        step0 = begin // self.order
        opts = dict(self._options)
        if eta is not None:
            opts["eta"] = eta
        if self.sampler == "ddim":
            targets = self._ddim_targets()
            source = s[step0:-1].copy()
            if self.config.get("rescale_betas_zero_snr") and self._schedule.prediction_type != "epsilon":
                # diffusers' DDIM keeps alphas_cumprod = 0 at the last training timestep, where the schedule has
                # 2**-24 (sigma 4096): take the row's limit (x0 = -v exactly), with an effectively infinite sigma.
                source[layout.timesteps.numpy()[step0:] == self._schedule.num_train_timesteps - 1] = 1e30
            parts = [build_plan("ddim", [source[r], targets[step0 + r]], prediction=self._schedule.prediction_type,
                                parametrization=self._schedule.parametrization, **opts)
                     for r in range(len(source))]
            plan = Plan("ddim", 0, np.concatenate([p.coef for p in parts]), np.full((len(parts), 2), -1, np.int64),
                        source, np.concatenate([p.noise for p in parts]), np.arange(len(parts)),
                        np.ones(len(parts), bool), s[step0:], parts[0].c_in0)
            dest = targets[step0:]
        elif self.sampler == "lms":
            # diffusers' LMS keeps its full-schedule coefficients when a run starts later (img2img): the
            # derivatives it does not have yet drop out of its sum, as the zeroed history drops them here.
            full = self._plan(s, opts)
            first = int(np.nonzero(full.step == step0)[0][0])
            plan = replace(full, coef=full.coef[first:], slots=full.slots[first:], sigma_eval=full.sigma_eval[first:],
                           noise=full.noise[first:], step=full.step[first:] - step0, ends_step=full.ends_step[first:],
                           sigmas=s[step0:])
            dest = s[step0 + 1:][plan.step]
        else:
            plan = self._dpm_lower_order(self._plan(s[step0:], opts), s[step0:], opts)
            dest = plan.sigmas[plan.step + 1]
        plan = with_denoised_slot(plan)
        coef = self._fold(plan.coef.copy(), plan.sigma_eval, dest)
        return coef, plan.slots.copy(), plan.K

    def _fold(self, coef: np.ndarray, sigma_in: np.ndarray, sigma_out: np.ndarray) -> np.ndarray:
        """Fold the latents' scale into each row. x enters the row linearly, so P, AX and BX scale by the incoming
        factor; the row's output is the next latents, so every coefficient of x_new scales by the outgoing one."""
        if self._schedule.latent_space != "vp":
            return coef
        k_in = np.sqrt(sigma_in**2 + 1)
        k_out = 1 / np.sqrt(sigma_out**2 + 1)
        for col in (P, AX, BX):
            coef[:, col] *= k_in
        for col in [AX, AD, AZ] + list(range(AH, AH + (coef.shape[1] - AH) // 2)):
            coef[:, col] *= k_out
        return coef

    def _ddim_targets(self) -> np.ndarray:
        """Where each of diffusers' DDIM steps lands: the training sigma at ``t - T // steps`` (or the final)."""
        schedule, layout = self._schedule, self._layout
        T = schedule.num_train_timesteps
        prev = layout.timesteps.numpy() - T // self.num_inference_steps
        train = schedule.train_sigmas.numpy()
        return np.where(prev >= 0, train[np.clip(prev, 0, T - 1)], layout.sigmas[-1])

    def _dpm_lower_order(self, plan, sub: np.ndarray, opts: Mapping):
        """Where DPM-Solver lowers its order on its last steps and the sampler's table does not, splice in the
        lower-order rows, each taken from the same sampler's table over the steps it looks back on."""
        if self.config.schedule_class != _DPM or self._flow:
            return plan
        cfg = self.config
        n = len(self._layout.timesteps)
        low = bool(cfg.get("lower_order_final", True)) and n < 15
        last = bool(cfg.get("euler_at_final")) or low
        kw = dict(prediction=self._schedule.prediction_type, parametrization=self._schedule.parametrization)
        coef, slots = plan.coef.copy(), plan.slots.copy()
        m = len(sub) - 1
        if last and sub[-1] > 0 and sub[-1] < sub[-2]:  # (a step to 0 is first order in the table already)
            one = build_plan(self.sampler, sub[-2:], **kw, **opts)
            coef[-1], slots[-1] = one.coef[0], one.slots[0]
        if low and self.sampler == "dpmpp_3m_sde" and m >= 4:
            j = m - 2  # this run's row of the second-last step: second order there
            two = build_plan(self.sampler, sub[j - 1: j + 2], **kw, **opts)
            row, srow = two.coef[1].copy(), two.slots[1].copy()
            if j % 2 != 1:  # the small table's slot ring has the other parity: swap its two slots
                bh = BH(plan.K)
                row[[AH, AH + 1]] = row[[AH + 1, AH]]
                row[[bh, bh + 1]] = row[[bh + 1, bh]]
                srow = np.where(srow >= 0, 1 - srow, srow)
            coef[j], slots[j] = row, srow
        if np.array_equal(coef, plan.coef) and np.array_equal(slots, plan.slots):
            return plan
        return replace(plan, coef=coef, slots=slots, noise=coef[:, AZ] != 0.0)

    def _step_eta(self, eta: float | None) -> float | None:
        """The eta a step runs with: DDIM's per-call argument (else the configured one); None for the others."""
        if self.sampler != "ddim":
            return None
        return float(self._options["eta"] if eta is None else eta)

    def _prepare_rows(self, first: int, eta: float | None, device: torch.device) -> _Rows:
        key = (first, eta, str(device))
        rows = self._row_cache.get(key)
        if rows is None:
            coef, slots, K = self._host_rows(first, eta)
            rows = self._row_cache[key] = _Rows(
                coef=torch.as_tensor(coef, dtype=torch.float32).to(device),
                slots=torch.as_tensor(slots, dtype=torch.int64).to(device), K=K, noisy=coef[:, AZ] != 0.0,
                slot_d=slots[:, 0].copy(), first=first, eta=eta, device=torch.device(device))
        return rows

    def _draws_noise(self, eta: float | None) -> bool:
        if self._method.noise is None:
            return False
        return float(self._options.get("eta", 1.0) if eta is None else eta) > 0

    # ---------------------------------------------------------------------------------------------- step

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        """The network input: ``sample / sqrt(sigma^2 + 1)`` for the Euler family, ``sample`` otherwise."""
        schedule = self._require_schedule("scale_model_input")
        if schedule.latent_space != "ve":
            return sample
        if self._step_index is None:
            self._init_step_index(timestep)
        sigma = self._row_sigma32[self._step_index]
        return sample / ((sigma**2 + 1) ** 0.5)

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, eta: float | None = None,
             generator: torch.Generator | list | None = None, variance_noise: torch.Tensor | None = None,
             return_dict: bool = True, **kwargs: Any) -> SchedulerStepOutput | tuple:
        """One step of the sampler: one fused ``sampler_step`` launch, no host-device synchronisation.

        Args:
            model_output: ``[B, ...]`` the network's raw output (after the pipeline's guidance).
            timestep: the entry of ``self.timesteps`` being stepped (used only to find the first step index when
                no ``set_begin_index`` was given).
            sample: ``[B, ...]`` the current latents.
            eta: DDIMScheduler's per-step eta (pipelines pass their ``eta`` argument): used by the ``ddim``
                sampler; other samplers take ``eta`` from :meth:`from_config` and accept only None / 0 here.
            generator: the source of the per-step noise of the stochastic samplers, drawn as the diffusers class
                draws it (shape, dtype, one draw per call), so the same generator gives the same noise.
            variance_noise: noise to use instead of drawing it (DDIM's and DPM-Solver's argument).
            return_dict: return a :class:`SchedulerStepOutput` (else a tuple, as the diffusers class).
            **kwargs: the diffusers classes' other step options, at their defaults only (``s_churn=0``,
                ``s_noise=1``, ``use_clipped_model_output=False``, LMS's ``order`` equal to the configured one).

        Returns:
            ``prev_sample`` (``[B, ...]`` in ``model_output``'s dtype) and, for the classes whose step returns it,
            ``pred_original_sample`` (a copy of the step's denoised estimate).
        """
        self._require_schedule("step")
        self._check_step_kwargs(eta, kwargs)
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output {tuple(model_output.shape)} and sample {tuple(sample.shape)} must have "
                             "the same shape")
        if self._step_index is None:
            self._init_step_index(timestep)
        eta = self._step_eta(eta)
        rows = self._rows
        if rows is None:  # the first step of a run: its rows (uploaded by set_timesteps / set_begin_index when
            #               they were given the device) and a zeroed history
            if self._step_index % self.order:
                raise ValueError(f"the run starts at step index {self._step_index}, inside a two-evaluation step "
                                 f"(order {self.order}); start at a multiple of {self.order}")
            rows = self._rows = self._prepare_rows(self._step_index, eta, sample.device)
            self._hist = torch.zeros((rows.K, *sample.shape), dtype=torch.float32, device=sample.device)
        elif rows.eta != eta or rows.device != sample.device:
            raise ValueError(f"step() got eta={eta} on {sample.device} in a run that started with eta={rows.eta} on "
                             f"{rows.device}; call set_timesteps to start a new run")
        e = self._step_index - rows.first
        if e >= rows.coef.shape[0]:
            raise ValueError(f"step() called for step index {self._step_index}, past the {len(self._timesteps_host)} "
                             "steps of the schedule; call set_timesteps to start a new run")
        noise = None
        if self._draws_noise(eta):
            if variance_noise is not None:
                noise = variance_noise
            else:
                dtype = torch.float32 if self._method.noise == "float32" else model_output.dtype
                noise = randn_tensor(model_output.shape, generator=generator, device=model_output.device, dtype=dtype)
        x = sample.to(torch.float32).contiguous()
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        sampler_step(x, model_output, rows.coef[e], rows.slots[e], self._hist, noise if rows.noisy[e] else None,
                     out=out)
        prev = out.to(model_output.dtype)
        x0 = self._hist[int(rows.slot_d[e])].clone() if self._method.returns_x0 and not self._flow else None
        self._step_index += 1
        if not return_dict:
            return (prev, x0) if x0 is not None else (prev,)
        return SchedulerStepOutput(prev_sample=prev, pred_original_sample=x0)

    def _check_step_kwargs(self, eta: float | None, kwargs: dict) -> None:
        if eta is not None and self.sampler != "ddim" and float(eta) != 0.0:
            raise ValueError(f"step(eta={eta}): eta is a per-step argument only for the 'ddim' sampler (as "
                             f"DDIMScheduler.step); set the {self.sampler!r} sampler's options with "
                             "Scheduler.from_config(..., eta=...)")
        defaults = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": float("inf"), "s_noise": 1.0,
                    "use_clipped_model_output": False, "per_token_timesteps": None}
        for key, value in kwargs.items():
            if key == "order" and self.sampler == "lms":
                if value != self._options["order"]:
                    raise ValueError(f"step(order={value}): this scheduler's LMS order is {self._options['order']}; "
                                     "set it with Scheduler.from_config(..., order=...)")
                continue
            if key not in defaults:
                raise TypeError(f"step() got an unexpected keyword argument {key!r}")
            if value is not defaults[key] and value != defaults[key]:
                raise ValueError(f"step({key}={value!r}) is not supported (only its default, {defaults[key]!r}); "
                                 "the sampler's own options are set with Scheduler.from_config(...)")

    # ----------------------------------------------------------------------------------------- add noise

    def _noise_indices(self, timesteps: torch.Tensor) -> list[int]:
        count = timesteps.reshape(-1).shape[0]
        if self._begin_index is None:
            return [self.index_for_timestep(t) for t in timesteps.reshape(-1)]
        return [self._step_index if self._step_index is not None else self._begin_index] * count

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The forward process at ``timesteps``, in the latents' convention (img2img's starting latents).

        Euler family ``x0 + sigma * noise``; DDIM / DPM-Solver / UniPC ``alpha * x0 + sigma_vp * noise``;
        flow matching ``(1 - sigma) * x0 + sigma * noise``. As in diffusers, the noise level comes from the begin
        index when one is set (no device read), else from looking ``timesteps`` up (DDIM indexes its training
        table by the timesteps themselves).
        """
        schedule = self._require_schedule("add_noise")
        if schedule.latent_space == "flow":
            return self.scale_noise(original_samples, timesteps, noise)
        if self.config.schedule_class == _DDIM:
            abar = schedule.alphas_cumprod.to(device=original_samples.device, dtype=original_samples.dtype)
            a = abar[timesteps.to(original_samples.device)].flatten()
            while a.dim() < original_samples.dim():
                a = a.unsqueeze(-1)
            return a**0.5 * original_samples + (1 - a) ** 0.5 * noise
        sigmas = self.sigmas.to(device=original_samples.device, dtype=original_samples.dtype)
        sigma = sigmas[self._noise_indices(timesteps)].flatten()
        while sigma.dim() < original_samples.dim():
            sigma = sigma.unsqueeze(-1)
        if schedule.latent_space == "ve":
            return original_samples + noise * sigma
        alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
        return alpha_t * original_samples + sigma * alpha_t * noise

    def scale_noise(self, sample: torch.Tensor, timestep: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The flow-matching forward process ``sigma * noise + (1 - sigma) * sample``, as FlowMatchEuler's."""
        schedule = self._require_schedule("scale_noise")
        if schedule.latent_space != "flow":
            raise ValueError("scale_noise is the flow-matching forward process; this scheduler follows "
                             f"{schedule.class_name}'s rules (not flow matching): use add_noise")
        sigmas = self.sigmas.to(device=sample.device, dtype=sample.dtype)
        sigma = sigmas[self._noise_indices(timestep)].flatten()
        while sigma.dim() < sample.dim():
            sigma = sigma.unsqueeze(-1)
        return sigma * noise + (1.0 - sigma) * sample

    # -------------------------------------------------------------------------- the fused loop's contract

    def _begin_step(self) -> int:
        return (self._begin_index or 0) // self.order

    def sampling_args(self) -> dict:
        """Keyword arguments for :func:`diffusion_fast.sample` that walk the trajectory ``step`` walks.

        Returns ``{"sigmas": [N + 1] float64 CPU tensor (from the begin index on), "sampler", "prediction",
        "parametrization", **sampler options}``. Start ``sample`` from :meth:`latents_to_state` of the
        pipeline's latents, have the model wrapper give the network :meth:`model_timestep` of the sigma it
        receives, and map the result back with :meth:`state_to_latents`. A zero-length final step (see
        :func:`~diffusion_fast.schedules.from_diffusers_config`) is left out: the same result, one network call
        less. With ``sampler='ddim'`` the ``eta`` here is the configured one; a pipeline's ``eta`` replaces it.

        Raises:
            ValueError: where diffusers' method walks a path no single sigma sequence describes: DDIM steps
                landing between the listed timesteps ("linspace" / "trailing" spacing), LMS starting after step 0
                (img2img: diffusers keeps its full-schedule coefficients), DPM-Solver lowering its order where the
                table does not (with fewer than 15 steps: the second-last step of ``solver_order=3``, a last step
                ending above 0; ``euler_at_final``), UniPC's corrector on a zero-length final step, DDIM with
                ``rescale_betas_zero_snr`` starting at its infinite sigma.
        """
        schedule = self._require_schedule("sampling_args")
        step0 = self._begin_step()
        layout_s = self._layout.sigmas[step0:]
        if self.sampler == "ddim" and not np.array_equal(self._ddim_targets()[step0:], layout_s[1:]):
            raise ValueError("DDIMScheduler steps from t to t - T // steps, which lies between the listed timesteps "
                             f"with timestep_spacing={self.config.get('timestep_spacing')!r}: no single sigma "
                             "sequence walks that path; use step(), or 'leading' spacing")
        if self.sampler == "ddim" and self.config.get("rescale_betas_zero_snr") \
                and schedule.prediction_type != "epsilon" and step0 == 0 \
                and int(self._layout.timesteps[0]) == schedule.num_train_timesteps - 1:
            raise ValueError("DDIMScheduler with rescale_betas_zero_snr starts from alphas_cumprod = 0 (an infinite "
                             "sigma, which step() takes as its limit); the sigmas here start at 4096 (alphas_cumprod "
                             "2**-24, as diffusers' Euler / DPM-Solver / UniPC), about 1e-4 apart: use step(), or "
                             "sampler='euler' / 'dpmpp_2m' / 'unipc'")
        if self.sampler == "lms" and step0 > 0:
            raise ValueError(f"LMSDiscreteScheduler keeps its full-schedule coefficients when a run starts at step "
                             f"{step0} (img2img), where sample() over the remaining sigmas starts its multistep "
                             "afresh: use step()")
        if self.sampler == "unipc" and self._layout.zero_length_final:
            raise ValueError("UniPCMultistepScheduler applies its corrector on the zero-length final step of this "
                             "config (final_sigmas_type='sigma_min' after Karras / exponential / beta sigmas); "
                             "sample() has no such step: use step(), or final_sigmas_type='zero'")
        plan = self._plan(layout_s, self._options)
        if self._dpm_lower_order(plan, layout_s, self._options) is not plan:
            raise ValueError("DPMSolverMultistepScheduler lowers its order on the last steps here where sample()'s "
                             "table does not (lower_order_final with fewer than 15 steps: the second-last step of "
                             "solver_order=3, and a last step that ends above sigma 0; euler_at_final): use step(), "
                             "or 15 steps or more and final_sigmas_type='zero'")
        s = schedule.sigmas.numpy()[step0:].copy()
        return {"sigmas": torch.from_numpy(s), "sampler": self.sampler, "prediction": schedule.prediction_type,
                "parametrization": schedule.parametrization, **self._options}

    def _timestep_table(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        table = self._t_tables.get(key)
        if table is None:
            sig = torch.as_tensor(self._eval_sigmas, dtype=torch.float32).to(device)
            ts = torch.as_tensor(self._timesteps_host).to(device)
            table = self._t_tables[key] = (sig, ts)
        return table

    def model_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The timestep the stock scheduler gives the network at evaluation sigma ``sigma`` (any shape).

        An evaluation sigma of this schedule (as ``sample()`` passes them) maps to exactly the entry of
        ``timesteps`` the stock loop feeds there, in its dtype; any other sigma to the schedule's continuous map
        (``Schedule.sigma_to_timestep``, rounded for classes with integer timesteps). Device arithmetic only: no
        host synchronisation, safe inside a CUDA-graph capture once the table is on the device
        (``set_timesteps(device=...)`` puts it there, or the first call).
        """
        schedule = self._require_schedule("model_timestep")
        if not isinstance(sigma, torch.Tensor) or not sigma.is_floating_point():
            raise TypeError(f"sigma must be a floating-point torch.Tensor, got {type(sigma).__name__}")
        table_s, table_t = self._timestep_table(sigma.device)
        s = sigma.to(torch.float32)
        d = (s.unsqueeze(-1) - table_s).abs()
        idx = d.argmin(-1)
        exact = d.gather(-1, idx.unsqueeze(-1)).squeeze(-1) <= 1e-6 * s
        other = schedule.sigma_to_timestep(s)
        if not table_t.is_floating_point():
            other = other.round()
        return torch.where(exact, table_t[idx], other.to(table_t.dtype))

    def _k(self, sigma: float) -> float:
        return math.sqrt(sigma * sigma + 1) if self._schedule.latent_space == "vp" else 1.0

    def latents_to_state(self, latents: torch.Tensor) -> torch.Tensor:
        """The pipeline's starting latents as the state ``sample()`` integrates (at the begin index's sigma)."""
        schedule = self._require_schedule("latents_to_state")
        k = self._k(float(schedule.sigmas.numpy()[self._begin_step()]))  # a host value, read without dispatch
        return latents * k if k != 1.0 else latents

    def state_to_latents(self, x: torch.Tensor) -> torch.Tensor:
        """``sample()``'s final state as the pipeline's latents (at the final sigma)."""
        schedule = self._require_schedule("state_to_latents")
        k = self._k(schedule.final_sigma)
        return x / k if k != 1.0 else x
