"""Samplers: coefficient tables (tables.py) driven by one shared loop (loop.py)."""

SAMPLERS = ("euler", "euler_ancestral", "heun", "dpm_2", "lms", "ddim", "dpmpp_2m", "dpmpp_2m_sde",
            "dpmpp_3m_sde", "unipc")


def sample(*args, **kwargs):  # replaced by loop.sample
    raise NotImplementedError
