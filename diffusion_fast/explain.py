"""``diffusion-fast explain``: the diffusion process shown on one self-contained HTML page, from real runs.

    from diffusion_fast.explain import Explainer
    page = Explainer("a handwritten seven", seed=0).run()
    open("explain.html", "w").write(page.html)

Every picture on the page is made by the embedded digits model during :meth:`Explainer.run`; none is stored.
The page has five sections:

1. noise to image: the state after every step and the model's guess of the final image, with sigma
   (also as an animated GIF, :attr:`Explanation.gif`);
2. the prompt steers: one seed at guidance 0, 1, 2, 4, 8, and with two different prompts;
3. steps trade speed for quality: one seed at 1, 2, 5, 10, 20, 50 steps, the time of each, and the digits
   judge's accuracy over 10 digits x 3 images per step count (inline SVG charts);
4. the seed fixes the result: 8 seeds, and one seed run twice with the fingerprints of both images;
5. samplers: one seed through every sampler at 10 steps, with time and accuracy.

The images are deterministic: the same arguments on the same machine, torch build and thread count give
byte-identical PNGs and GIF. Measured times differ from run to run and appear only as text.

The page is plain HTML with inline CSS and images as ``data:`` URIs: no script, no network, no other file.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .judge import DigitsJudge
from .pipeline import Pipeline, PipelineOutput, grid
from .samplers import DESCRIPTIONS, OPTIONS, SAMPLERS, describe

GUIDANCE = (0.0, 1.0, 2.0, 4.0, 8.0)
STEP_COUNTS = (1, 2, 5, 10, 20, 50)
NUM_SEEDS = 8
JUDGE_IMAGES_PER_DIGIT = 3  # the judge reads 10 digits x 3 images for each setting it scores
SAMPLER_STEPS = 10
MAX_SEED = 2 ** 64 - NUM_SEEDS  # seeds seed .. seed + 7 must all fit torch's 64-bit generator seed
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
JUDGE_TEMPLATE = "a handwritten {word}"
SCALE = 10  # an 8x8 digit is drawn 80 px wide
STRIP_SCALE = 5  # the step-by-step row: 21 pairs on one line
GIF_SCALE = 16
SECTIONS = ("noise", "prompt", "steps", "seed", "samplers")


@dataclass(frozen=True)
class _Call:
    """One pipeline call. ``rerun`` tells apart deliberate repeats of the same call."""

    prompts: tuple[str, ...]
    seed: int
    steps: int
    guidance: float
    sampler: str
    num_images: int = 1
    trajectory: bool = False
    rerun: int = 0


@dataclass
class _Result:
    out: PipelineOutput
    seconds: float
    network_calls: int  # UNet evaluations the call made, counted (adaptive samplers decide them while running)


@dataclass
class Explanation:
    """What :meth:`Explainer.run` returns.

    Attributes:
        html: the page (UTF-8 text, self-contained).
        gif: the animated GIF of section 1 (the same bytes the page embeds).
        seconds: wall time of the whole run.
        runs: how many pipeline calls made the pictures.
        pictures: how many ``<img>`` the page holds.
        accuracy_by_steps: step count -> fraction of the judge's sample read as prompted.
        accuracy_by_sampler: sampler -> the same, at :data:`SAMPLER_STEPS` steps.
        same_seed_identical: whether the two runs of one seed gave bit-identical images.
    """

    html: str
    gif: bytes
    seconds: float
    runs: int = 0
    pictures: int = 0
    accuracy_by_steps: dict[int, float] = field(default_factory=dict)
    accuracy_by_sampler: dict[str, float] = field(default_factory=dict)
    same_seed_identical: bool = False


def command_line(prompt: str, *, seed: int, sampler: str, output: str = "explain.html", gif: Optional[str] = None,
                 threads: int = 1) -> str:
    """The ``diffusion-fast explain`` command that makes the same page (shell-quoted)."""
    parts = ["diffusion-fast", "explain", prompt, "--seed", str(seed), "--sampler", sampler, "-o", output]
    if gif is not None:
        parts += ["--gif", gif]
    if threads != 1:
        parts += ["--threads", str(threads)]
    return shlex.join(parts)


class Explainer:
    """Runs the embedded digits model in every way the page shows and renders the page.

    Args:
        prompt: what to draw, e.g. ``"a handwritten seven"`` (words from the model's vocabulary).
        seed: the seed of every picture (section 4 also uses ``seed + 1`` .. ``seed + 7``).
        sampler: the sampler of sections 1 to 4 (default: the model's, ``dpmpp_2m``).
        pipe: the digits pipeline (default: ``Pipeline.from_pretrained("digits")`` on the CPU).
        judge: the digits judge (default: :meth:`DigitsJudge.load`).

    Raises ValueError / TypeError for a bad argument, before any sampling.
    """

    def __init__(self, prompt: str, *, seed: int = 0, sampler: Optional[str] = None,
                 pipe: Optional[Pipeline] = None, judge: Optional[DigitsJudge] = None) -> None:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed must be in [0, {MAX_SEED}] (the page also uses seed + 1 .. seed + "
                             f"{NUM_SEEDS - 1}), got {seed}")
        self.pipe = Pipeline.from_pretrained("digits") if pipe is None else pipe
        defaults = self.pipe.defaults
        self.sampler = defaults.get("sampler", "dpmpp_2m") if sampler is None else sampler
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler: unknown sampler {self.sampler!r}; choose from {', '.join(SAMPLERS)}")
        self.pipe.tokenizer.encode(prompt)  # ValueError naming an unknown word, before any work
        self.prompt, self.seed = prompt, seed
        self.steps = int(defaults.get("steps", 20))
        self.guidance = float(defaults.get("guidance_scale", 1.0))
        self.other_prompt = _other_prompt(self.pipe.tokenizer.split(prompt))
        self.judge = DigitsJudge.load() if judge is None else judge

    # -- the runs ----------------------------------------------------------------------------------------
    def _main(self, **change: Any) -> _Call:
        base = dict(prompts=(self.prompt,), seed=self.seed, steps=self.steps, guidance=self.guidance,
                    sampler=self.sampler)
        base.update(change)
        return _Call(**base)

    def _judge_call(self, steps: int, sampler: str) -> _Call:
        return _Call(prompts=tuple(JUDGE_TEMPLATE.format(word=w) for w in WORDS), seed=self.seed, steps=steps,
                     guidance=self.guidance, sampler=sampler, num_images=JUDGE_IMAGES_PER_DIGIT)

    def calls(self) -> list[_Call]:
        """Every pipeline call the page needs, once each, in the order they run."""
        wanted = [self._main(trajectory=True)]
        wanted += [self._main(guidance=g) for g in GUIDANCE]
        wanted += [self._main(), self._main(prompts=(self.other_prompt,))]
        for n in STEP_COUNTS:
            wanted += [self._judge_call(n, self.sampler), self._main(steps=n)]
        wanted += [self._main(seed=self.seed + k) for k in range(NUM_SEEDS)]
        wanted += [self._main(rerun=1), self._main(rerun=2)]
        for s in SAMPLERS:
            wanted += [self._judge_call(SAMPLER_STEPS, s), self._main(steps=SAMPLER_STEPS, sampler=s)]
        return list(dict.fromkeys(wanted))

    def _run_one(self, call: _Call) -> _Result:
        prompt = call.prompts[0] if len(call.prompts) == 1 else list(call.prompts)
        count = [0]
        hook = self.pipe.unet.register_forward_pre_hook(lambda module, args: count.__setitem__(0, count[0] + 1))
        try:
            t0 = time.perf_counter()
            out = self.pipe(prompt, steps=call.steps, guidance_scale=call.guidance, seed=call.seed,
                            sampler=call.sampler, num_images=call.num_images, progress=False,
                            return_trajectory=call.trajectory)
            seconds = time.perf_counter() - t0
        finally:
            hook.remove()
        return _Result(out, seconds, count[0])

    def run(self, *, progress: Optional[bool] = None, command: Optional[str] = None) -> Explanation:
        """Make every picture and render the page.

        Args:
            progress: a progress bar on stderr (default: when stderr is a terminal).
            command: the command line the page quotes as the way to reproduce it (default:
                :func:`command_line` with this prompt, seed and sampler).
        """
        from tqdm.auto import tqdm

        t_start = time.perf_counter()
        todo = self.calls()
        enabled = sys.stderr.isatty() if progress is None else bool(progress)
        results: dict[_Call, _Result] = {}
        with torch.no_grad(), tqdm(todo, desc="explain", unit="run", file=sys.stderr, disable=not enabled,
                                   leave=False) as bar:
            for call in bar:
                results[call] = self._run_one(call)
        page = _Page(self, results)
        seconds = time.perf_counter() - t_start
        command = command or command_line(self.prompt, seed=self.seed, sampler=self.sampler)
        text = page.render(command, seconds)
        return Explanation(html=text, gif=page.gif, seconds=seconds, runs=len(results),
                           pictures=text.count("<img "),
                           accuracy_by_steps=page.accuracy_by_steps, accuracy_by_sampler=page.accuracy_by_sampler,
                           same_seed_identical=page.same_seed_identical)


def _adds_noise(sampler: str) -> str:
    """"yes" / "no" for the sampler with its default options (some add noise only with an option, e.g. eta > 0)."""
    kind = str(describe(sampler)["stochastic"])
    if kind in ("yes", "no"):
        return kind
    option = kind.split()[1]  # "with eta > 0", "with s_churn > 0"
    return "yes" if (OPTIONS[sampler].get(option) or 0) > 0 else f"no (yes {kind})"


def _other_prompt(words: Sequence[str]) -> str:
    """A second prompt for section 2: the prompt with its digit swapped (seven -> three, 3 -> 8), or
    "a handwritten three" when the prompt names no digit."""
    numerals = [str(d) for d in range(10)]
    for k, w in enumerate(words):
        for names in (WORDS, numerals):
            if w in names:
                d = names.index(w)
                swapped = list(words)
                swapped[k] = names[8 if d == 3 else 3]
                return " ".join(swapped)
    return JUDGE_TEMPLATE.format(word="three")


# -- pictures --------------------------------------------------------------------------------------------

def _png(picture) -> bytes:
    buf = io.BytesIO()
    picture.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _big(image, scale: int = SCALE):
    return grid([image], scale=scale)


def _gif(frames: Sequence, durations: Sequence[int]) -> bytes:
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=list(frames[1:]), duration=list(durations),
                   loop=0, optimize=False, disposal=1)
    return buf.getvalue()


def _fingerprint(samples: torch.Tensor) -> str:
    """SHA-256 of the image's float32 pixel values."""
    return hashlib.sha256(samples.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


# -- HTML ------------------------------------------------------------------------------------------------

CSS = """
body { font: 16px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222; background: #fafaf7;
       margin: 0; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 32px 48px; }
h1 { font-size: 30px; margin: 8px 0 4px; }
h2 { font-size: 22px; margin: 40px 0 6px; border-top: 1px solid #ddd; padding-top: 24px; }
p { max-width: 820px; margin: 8px 0; }
p.lead { font-size: 18px; color: #444; }
code, pre { font: 14px/1.4 ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; }
pre { background: #f0efe9; padding: 10px 12px; border-radius: 6px; white-space: pre-wrap; word-break: break-all; }
img { image-rendering: pixelated; image-rendering: crisp-edges; display: block; margin: 0 auto; }
img.digit { outline: 1px solid #c8c8c8; }
.row { display: flex; flex-wrap: wrap; gap: 14px; align-items: flex-start; margin: 14px 0; }
.row > p, .row > div:not(.group):not(.legend) { flex: 1 1 320px; margin-top: 0; }
.row.tight { gap: 4px; }
figure { margin: 0; text-align: center; }
figcaption { font-size: 13px; color: #555; margin-top: 4px; line-height: 1.3; }
.row.digits { gap: 8px; }
.row.digits figure { width: 96px; }
.row.digits figcaption { font-size: 12px; overflow-wrap: anywhere; }
.tight figcaption { font-size: 10px; }
.legend { font-size: 12px; color: #555; width: 84px; line-height: 1.3; }
.group { border-left: 3px solid #c9c4b5; padding-left: 14px; }
.group h3 { font-size: 15px; margin: 0 0 4px; font-weight: 600; }
.same { color: #1b6e2a; font-weight: 600; }
.differ { color: #a3231b; font-weight: 600; }
.hash { font: 11px ui-monospace, Menlo, Consolas, monospace; color: #333; }
table { border-collapse: collapse; font-size: 13px; margin: 12px 0; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 10px; text-align: left; vertical-align: top; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.about { background: #f0efe9; border-radius: 8px; padding: 4px 20px 12px; margin-top: 40px; }
.about dt { font-weight: 600; margin-top: 8px; }
.about dd { margin: 0 0 0 0; }
svg text { font: 12px system-ui, sans-serif; fill: #333; }
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _img(data: bytes, alt: str, mime: str = "image/png", cls: str = "") -> str:
    from PIL import Image

    w, h = Image.open(io.BytesIO(data)).size
    uri = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
    attr = f' class="{cls}"' if cls else ""
    return f'<img src="{uri}" width="{w}" height="{h}" alt="{_e(alt)}"{attr}>'


def _figure(data: bytes, alt: str, caption: str, mime: str = "image/png", cls: str = "digit") -> str:
    """``caption`` is HTML (callers escape what they insert)."""
    return f"<figure>{_img(data, alt, mime, cls)}<figcaption>{caption}</figcaption></figure>"


def _ms(seconds: float) -> str:
    ms = seconds * 1000
    return f"{ms:.0f} ms" if ms >= 10 else f"{ms:.1f} ms"


def _sigma(s: float) -> str:
    return "0" if s == 0 else f"{s:.3g}"


def _chart(title: str, labels: Sequence[str], values: Sequence[float], texts: Sequence[str], *, top: float,
           bars: bool, color: str, x_title: str) -> str:
    """A small inline SVG chart: one value per category, as bars or as a line with dots."""
    W, H, left, right, top_pad, bottom = 420, 230, 44, 12, 48, 44
    pw, ph = W - left - right, H - top_pad - bottom
    n = len(values)
    step = pw / n
    xs = [left + step * (k + 0.5) for k in range(n)]
    ys = [top_pad + ph * (1 - (min(max(v, 0.0), top) / top if top > 0 else 0)) for v in values]
    out = [f'<svg width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           f'role="img" aria-label="{_e(title)}">',
           f'<text x="{left}" y="18" style="font-weight:600">{_e(title)}</text>',
           f'<line x1="{left}" y1="{top_pad + ph}" x2="{W - right}" y2="{top_pad + ph}" stroke="#999"/>',
           f'<line x1="{left}" y1="{top_pad}" x2="{left}" y2="{top_pad + ph}" stroke="#999"/>']
    for frac in (0.0, 0.5, 1.0):
        y = top_pad + ph * (1 - frac)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{W - right}" y2="{y:.1f}" stroke="#e4e4e4"/>')
    if bars:
        bw = step * 0.6
        for x, y in zip(xs, ys):
            out.append(f'<rect x="{x - bw / 2:.1f}" y="{y:.1f}" width="{bw:.1f}" height="{top_pad + ph - y:.1f}" '
                       f'fill="{color}"/>')
    else:
        pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys))
        out.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2"/>')
        out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{color}"/>' for x, y in zip(xs, ys)]
    for x, y, t, lab in zip(xs, ys, texts, labels):
        out.append(f'<text x="{x:.1f}" y="{y - 8:.1f}" text-anchor="middle">{_e(t)}</text>')
        out.append(f'<text x="{x:.1f}" y="{top_pad + ph + 16}" text-anchor="middle">{_e(lab)}</text>')
    out.append(f'<text x="{left + pw / 2:.1f}" y="{H - 6}" text-anchor="middle">{_e(x_title)}</text>')
    out.append("</svg>")
    return "".join(out)


class _Page:
    """The pictures and numbers of one run, and their HTML."""

    def __init__(self, ex: Explainer, results: dict[_Call, _Result]) -> None:
        self.ex, self.results = ex, results
        pipe = ex.pipe
        traj = results[ex._main(trajectory=True)].out.trajectory
        self.traj = traj
        self.pairs = [_png(pipe.strip(traj[j:j + 1], scale=STRIP_SCALE)) for j in range(len(traj))]
        frames = [self._gif_frame(j) for j in range(len(traj))]
        self.gif = _gif(frames, [700] + [350] * (len(traj) - 2) + [2000])
        self.accuracy_by_steps = {n: self._accuracy(ex._judge_call(n, ex.sampler)) for n in STEP_COUNTS}
        self.accuracy_by_sampler = {s: self._accuracy(ex._judge_call(SAMPLER_STEPS, s)) for s in SAMPLERS}
        a, b = results[ex._main(rerun=1)].out.samples, results[ex._main(rerun=2)].out.samples
        self.same_seed_identical = bool(torch.equal(a, b))

    def _gif_frame(self, j: int):
        from PIL import Image, ImageDraw

        pair = self.ex.pipe.strip(self.traj[j:j + 1], scale=GIF_SCALE)
        w, h = pair.size
        frame = Image.new("L", (w, h + 10), 160)
        frame.paste(pair, (0, 0))
        done = j / (len(self.traj) - 1)  # a bar along the bottom: how far through the steps
        ImageDraw.Draw(frame).rectangle((0, h + 2, max(1, round(done * (w - 1))), h + 7), fill=40)
        return frame

    def _accuracy(self, call: _Call) -> float:
        samples = self.results[call].out.samples
        labels = torch.arange(len(WORDS)).repeat_interleave(call.num_images)
        return self.ex.judge.accuracy(samples * self.ex.pipe.pixel_max, labels)

    def _picture(self, call: _Call) -> bytes:
        return _png(_big(self.results[call].out.images[0]))

    def _seconds_per_image(self, call: _Call) -> float:
        r = self.results[call]
        return r.seconds / r.out.samples.shape[0]

    # -- sections --------------------------------------------------------------------------------------
    def noise(self) -> str:
        ex, traj = self.ex, self.traj
        n = len(traj) - 1
        figs = ['<div class="legend">top: the picture<br>bottom: the guess<br>under them: σ, the noise '
                'left</div>']
        for j, st in enumerate(traj):
            label = "noise" if st.i < 0 else f"step {st.i + 1}"
            figs.append(_figure(self.pairs[j], f"{label}: the picture and the model's guess",
                                f"{label}<br>σ {_sigma(st.sigma_next)}", cls=""))
        return (
            f'<div class="row"><figure>{_img(self.gif, "the picture developing, animated", "image/gif")}'
            f"<figcaption>animated: top the picture,<br>bottom the model's guess</figcaption></figure><div>"
            f"<p>The model starts from pure random noise and removes part of it at every step. At each step it "
            f"looks at the noisy picture, guesses what the finished picture will be (bottom), and moves the "
            f"picture a little towards that guess (top). <b>σ</b> (sigma) measures how much noise is left: "
            f"{_sigma(traj[0].sigma)} at the start, where the picture is almost pure noise, and 0 at the end. "
            f"Here {n} steps of the <code>{_e(ex.sampler)}</code> sampler draw “{_e(ex.prompt)}” from seed "
            f"{ex.seed}.</p>"
            f"<p>Early guesses are blurry averages — with that much noise many digits are possible. As the "
            f"noise falls, the guess commits to one shape and sharpens, and the picture follows it. The last "
            f"step removes the remaining noise, so the final picture is the model's last guess.</p></div></div>"
            f'<div class="row tight">{"".join(figs)}</div>')

    def prompt(self) -> str:
        ex = self.ex
        figs = []
        for g in GUIDANCE:
            what = {0.0: "prompt ignored", 1.0: "prompt alone"}.get(g, "pushed harder" if g > 1 else "")
            figs.append(_figure(self._picture(ex._main(guidance=g)), f"guidance {g:g}",
                                f"guidance {g:g}<br>{_e(what)}"))
        pair = [_figure(self._picture(ex._main(prompts=(p,))), p, f"“{_e(p)}”")
                for p in (ex.prompt, ex.other_prompt)]
        return (
            f"<p>The prompt is read by a small transformer, which turns it into numbers that the image network "
            f"sees at every step. <b>Classifier-free guidance</b> runs the network twice per step, once with the "
            f"prompt and once without, and moves the result away from the prompt-less guess by the guidance "
            f"scale: 0 ignores the prompt (the model draws whatever digit the noise suggests), 1 follows the "
            f"prompt as the model learned it, and larger values exaggerate what makes the picture match the "
            f"prompt. The default here is {ex.guidance:g}.</p>"
            f'<div class="row"><div class="group"><h3>Seed {ex.seed}, “{_e(ex.prompt)}”, guidance from 0 to '
            f'{GUIDANCE[-1]:g}</h3><div class="row digits">{"".join(figs)}</div></div>'
            f'<div class="group"><h3>Seed {ex.seed}, guidance {ex.guidance:g}, two prompts</h3>'
            f'<div class="row digits">{"".join(pair)}</div></div></div>'
            f"<p>Both prompts start from exactly the same noise; only the words differ, and they decide which "
            f"digit develops.</p>")

    def steps(self) -> str:
        ex = self.ex
        figs = []
        for n in STEP_COUNTS:
            call = ex._main(steps=n)
            figs.append(_figure(self._picture(call), f"{n} steps",
                                f"{n} step{'s' if n > 1 else ''}<br>{_ms(self.results[call].seconds)}"))
        k = JUDGE_IMAGES_PER_DIGIT
        acc = [self.accuracy_by_steps[n] for n in STEP_COUNTS]
        per_image = [self._seconds_per_image(ex._judge_call(n, ex.sampler)) * 1000 for n in STEP_COUNTS]
        labels = [str(n) for n in STEP_COUNTS]
        charts = (
            _chart("judge: digits read as the one asked for", labels, [100 * a for a in acc],
                   [f"{round(a * 10 * k)}/{10 * k}" for a in acc], top=100.0, bars=False, color="#2a6f97",
                   x_title="steps")
            + _chart("time per picture (in a batch of " + str(10 * k) + ")", labels, per_image,
                     [f"{v:.0f} ms" if v >= 10 else f"{v:.1f} ms" for v in per_image],
                     top=max(per_image) * 1.15, bars=True, color="#c97b2a", x_title="steps"))
        return (
            f"<p>Each step runs the image network once (twice for some samplers), so time grows with the number "
            f"of steps. With very few steps the model must jump from noise to a finished picture in one go and "
            f"returns little more than its first blurry guess; more steps give a sharper, more natural digit. "
            f"Below, seed {ex.seed} at each step count, with the time that one picture took.</p>"
            f'<div class="row digits">{"".join(figs)}</div>'
            f"<p>To score quality without a person looking, a <b>judge</b> — a separate classifier trained only "
            f"on real handwritten digits — reads {10 * k} generated digits at each step count (each of the ten "
            f"digits {k} times, prompt “{_e(JUDGE_TEMPLATE.format(word='…'))}”, seed {ex.seed}) and we count how "
            f"many it reads as the digit that was asked for. The times on the right are per picture when "
            f"{10 * k} are made together, which is cheaper per picture than one at a time.</p>"
            f'<div class="row">{charts}</div>')

    def seed(self) -> str:
        ex = self.ex
        figs = [_figure(self._picture(ex._main(seed=ex.seed + k)), f"seed {ex.seed + k}", f"seed {ex.seed + k}")
                for k in range(NUM_SEEDS)]
        twice = []
        for r in (1, 2):
            res = self.results[ex._main(rerun=r)]
            fp = _fingerprint(res.out.samples)
            twice.append(_figure(_png(_big(res.out.images[0])), f"seed {ex.seed}, run {r}",
                                 f'seed {ex.seed}, run {r}<br><span class="hash">{fp[:12]}</span>'))
        verdict = ('<span class="same">identical, bit for bit</span>' if self.same_seed_identical else
                   '<span class="differ">different — this machine did not reproduce the run</span>')
        return (
            f"<p>All the randomness comes from the <b>seed</b>: it fixes the starting noise (and, for the "
            f"samplers that add noise along the way, that noise too). A different seed gives a different "
            f"handwriting of the same digit; the same seed gives the same picture every time.</p>"
            f'<div class="row"><div class="group"><h3>“{_e(ex.prompt)}”, {NUM_SEEDS} seeds</h3>'
            f'<div class="row digits">{"".join(figs)}</div></div>'
            f'<div class="group"><h3>Seed {ex.seed}, made twice</h3>'
            f'<div class="row digits">{"".join(twice)}</div></div>'
            f"</div><p>The two pictures on the right come from two separate runs. The codes under them are "
            f"fingerprints (the first 12 hex digits of the SHA-256 of the pixel values): {verdict}.</p>")

    def samplers(self) -> str:
        ex = self.ex
        figs, rows = [], []
        k = JUDGE_IMAGES_PER_DIGIT
        for s in SAMPLERS:
            call = ex._main(steps=SAMPLER_STEPS, sampler=s)
            figs.append(_figure(self._picture(call), s, _e(s) + ("<br>(sections 1–4)" if s == ex.sampler else "")))
            noisy = _adds_noise(s)
            judge = ex._judge_call(SAMPLER_STEPS, s)
            rows.append(
                f"<tr><td><code>{_e(s)}</code></td><td class=num>{self.results[call].network_calls}</td>"
                f"<td>{noisy}</td>"
                f"<td class=num>{_ms(self.results[call].seconds)}</td>"
                f"<td class=num>{_ms(self._seconds_per_image(judge))}</td>"
                f"<td class=num>{round(self.accuracy_by_sampler[s] * 10 * k)}/{10 * k}</td>"
                f"<td>{_e(DESCRIPTIONS.get(s, ''))}</td>"
                f"</tr>")
        return (
            f"<p>A <b>sampler</b> is the rule that turns the model's guess into the next, less noisy picture. "
            f"Some call the network once per step, some twice; some look back at earlier guesses; some add "
            f"fresh noise at every step, so from the same seed they draw a different digit. Here every sampler "
            f"starts from the same noise (seed {ex.seed}) and takes {SAMPLER_STEPS} steps.</p>"
            f'<div class="row digits">{"".join(figs)}</div>'
            f"<table><thead><tr><th>sampler</th><th class=num>network calls</th><th>adds noise</th>"
            f"<th class=num>this picture</th><th class=num>per picture, batch of {10 * k}</th>"
            f"<th class=num>judge</th><th>method</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
            f"<p>“judge” is the share of {10 * k} digits ({k} of each, seed {ex.seed}, {SAMPLER_STEPS} steps) "
            f"that the judge reads as the digit asked for.</p>")

    # -- the page --------------------------------------------------------------------------------------
    def about(self, command: str, seconds: float) -> str:
        from . import __version__

        ex, pipe = self.ex, self.ex.pipe
        params = sum(p.numel() for m in (pipe.unet, pipe.text_encoder) for p in m.parameters())
        cfg = pipe.config
        tr = cfg.get("training", {})
        versions = (f"diffusion_fast {__version__}, torch {torch.__version__}, Python {platform.python_version()}, "
                    f"NumPy {_dist_version('numpy')}, Pillow {_dist_version('pillow')} on "
                    f"{platform.system()} {platform.machine()}, device {pipe.device}, "
                    f"{torch.get_num_threads()} torch thread{'s' if torch.get_num_threads() > 1 else ''}")
        held = ex.judge.held_out_accuracy
        held_txt = f"; it reads {100 * held:.1f}% of held-out real digits correctly" if held is not None else ""
        return (
            '<section class="about" id="about"><h2 style="border:0;margin-top:16px;padding-top:0">About this '
            'page</h2><dl>'
            f"<dt>Reproduce it</dt><dd><pre>{_e(command)}</pre>The same command on the same machine, torch build "
            f"and thread count gives the same pictures, bit for bit; the times will differ. Any single picture "
            f"is also what <code>diffusion-fast generate</code> makes with the same prompt, seed, steps, "
            f"guidance and sampler.</dd>"
            f"<dt>Model</dt><dd><code>{_e(cfg.get('name', 'digits'))}</code>: a text-conditional UNet and a "
            f"small prompt transformer, {params / 1e6:.2f} million parameters in all, trained on "
            f"{_e(tr.get('data', 'handwritten digits'))}; the network's output is a "
            f"<code>{_e(pipe.prediction)}</code>. Noise levels follow a Karras schedule from σ = "
            f"{pipe.sigma_max:g} down to {pipe.sigma_min:g}, then 0. "
            f"Defaults: {ex.steps} steps, guidance {ex.guidance:g}.</dd>"
            f"<dt>Sampler</dt><dd><code>{_e(ex.sampler)}</code> in sections 1–4 (section 5 compares all "
            f"{len(SAMPLERS)}): {_e(DESCRIPTIONS.get(ex.sampler, ''))}</dd>"
            f"<dt>Judge</dt><dd>A support-vector classifier trained on 70% of the same real digits and never on "
            f"generated ones, shipped with the package ({_e(ex.judge.metadata.get('recipe', ''))}){held_txt}."
            f"</dd>"
            f"<dt>Versions</dt><dd>{_e(versions)}</dd>"
            f"<dt>Made</dt><dd>in {seconds:.1f} s (wall clock, on this machine) by {len(self.results)} calls of "
            f"the pipeline; every picture on this page was drawn by the model during that run.</dd></dl></section>")

    def render(self, command: str, seconds: float) -> str:
        ex = self.ex
        titles = {
            "noise": "1. From noise to a picture",
            "prompt": "2. The prompt steers every step",
            "steps": "3. Steps trade speed for quality",
            "seed": "4. The seed fixes the result",
            "samplers": "5. Samplers",
        }
        body = "".join(f'<section id="{name}"><h2>{titles[name]}</h2>{getattr(self, name)()}</section>'
                       for name in SECTIONS)
        return (
            "<!DOCTYPE html>\n"
            '<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>How diffusion draws “{_e(ex.prompt)}”</title><style>{CSS}</style></head><body><main>"
            f"<h1>How diffusion draws “{_e(ex.prompt)}”</h1>"
            f'<p class="lead">An image model like Stable Diffusion does not paint a picture stroke by stroke: it '
            f"starts from random noise and removes the noise step by step, steered by the prompt. This page shows "
            f"that process on a tiny model that draws 8×8 handwritten digits, small enough to run on any computer "
            f"in seconds. Every picture here was made by the model when this page was made.</p>"
            f"{body}{self.about(command, seconds)}</main></body></html>\n")


def _dist_version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


__all__ = ["Explainer", "Explanation", "command_line", "GUIDANCE", "STEP_COUNTS", "SAMPLER_STEPS",
           "NUM_SEEDS", "JUDGE_IMAGES_PER_DIGIT", "SECTIONS"]
