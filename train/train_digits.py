"""Train the embedded text-to-image digits model on scikit-learn's handwritten digits (8x8, no download).

    python train/train_digits.py                      # writes diffusion_fast/weights/digits/
    python train/train_digits.py --iters 200 --out /tmp/digits-smoke

What is trained: the UNet (``UNetConfig.digits()``) and the prompt encoder together, in v-prediction with
EDM preconditioning (sigma_data = 1 after scaling the pixels to zero mean and unit std):

    x = x0 + sigma * n,   sigma ~ LogNormal(P_mean, P_std)
    net input = x / sqrt(sigma^2 + 1),   timestep = timestep_scale * ln(sigma) / 4
    target v  = (n - sigma * x0) / sqrt(sigma^2 + 1)            (loss: mean squared error on v)

so that the denoised estimate is ``D = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) * v`` — the conversion
``diffusion_fast.sample(..., prediction="v_prediction")`` applies. Prompts come from a small grammar ("a
handwritten seven", "the digit 7", "number 7", "seven", ...); with probability ``--p-uncond`` the prompt is
replaced by the empty prompt, the unconditional input of classifier-free guidance.

Deterministic for a seed: the same seed, thread count and torch build give bit-identical weights.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusion_fast.models.text import TextConfig, TextEncoder, WordTokenizer  # noqa: E402
from diffusion_fast.models.unet import UNet2DConditionModel, UNetConfig  # noqa: E402
from diffusion_fast.pipeline import FORMAT, timestep_from_sigma  # noqa: E402

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NUMERALS = tuple(str(d) for d in range(10))
# Prompt grammar: [prefix] [article] [adjective] [noun] digit — each slot empty half of the time.
PREFIXES = ("picture of", "image of", "drawing of", "a picture of", "an image of", "a drawing of")
ARTICLES = ("a", "an", "the")
ADJECTIVES = ("handwritten", "hand written", "hand drawn", "written", "drawn")
NOUNS = ("digit", "number", "numeral")
MAX_LENGTH = 12


def vocabulary() -> list[str]:
    words: list[str] = []
    for group in (WORDS, NUMERALS, PREFIXES, ARTICLES, ADJECTIVES, NOUNS):
        for phrase in group:
            for w in phrase.split():
                if w not in words:
                    words.append(w)
    return words


def random_prompt(digit: int, rng: np.random.Generator) -> str:
    parts = []
    for group in (PREFIXES, ARTICLES, ADJECTIVES, NOUNS):
        if rng.random() < 0.5:
            parts.append(group[rng.integers(len(group))])
    parts.append(WORDS[digit] if rng.random() < 0.5 else NUMERALS[digit])
    return " ".join(parts)


def load_data() -> tuple[torch.Tensor, torch.Tensor, float, float]:
    from sklearn.datasets import load_digits

    ds = load_digits()
    x = torch.tensor(ds.data, dtype=torch.float64)  # [1797, 64], values 0..16
    mean, std = float(x.mean()), float(x.std())
    x0 = ((x - mean) / std).float().view(-1, 1, 8, 8)
    return x0, torch.tensor(ds.target, dtype=torch.long), mean, std


def build(vocab: list[str]) -> tuple[UNet2DConditionModel, TextEncoder, WordTokenizer]:
    tok = WordTokenizer(vocab, MAX_LENGTH)
    text = TextEncoder(TextConfig(vocab_size=len(tok.vocab), max_length=MAX_LENGTH, width=64, layers=2, heads=4))
    unet = UNet2DConditionModel(UNetConfig.digits())
    return unet, text, tok


def v_loss(unet, text, x0, ids, sigma, noise, timestep_scale):
    """Mean squared error of the v-prediction; x0, noise [B, 1, 8, 8], sigma [B]."""
    s = sigma.view(-1, 1, 1, 1)
    c_in = 1 / torch.sqrt(s * s + 1)
    v_target = (noise - s * x0) * c_in
    v = unet((x0 + s * noise) * c_in, timestep_from_sigma(sigma, timestep_scale), text(ids))
    return (v - v_target).square().mean()


EVAL_BEGIN, EVAL_END = "<!-- evaluation: written by train/evaluate_digits.py -->", "<!-- /evaluation -->"


def model_card(config: dict) -> str:
    tr, u, te, tk, px = (config[k] for k in ("training", "unet", "text_encoder", "tokenizer", "pixels"))
    blocks = (f"blocks {tuple(u['block_out_channels'])} ({', '.join(u['down_block_types'])} down; "
              f"{', '.join(u['up_block_types'])} up)")
    return f"""# digits: the embedded text-to-image model

A small text-conditional diffusion model that draws 8x8 handwritten digits from prompts such as
"a handwritten seven", "seven", "7", "the digit 7" or "number 7". It is what `diffusion-fast generate`
runs by default; it exists so that the pipeline can be seen working on a machine with no GPU and no network.

## Data
scikit-learn's bundled handwritten digits (`sklearn.datasets.load_digits`: 1,797 images, 8x8, intensities
0..16, ten classes; no download). All images are used; pixels are scaled to zero mean and unit standard
deviation over the whole set (mean {px['mean']:.4f}, std {px['std']:.4f}).

## Model
- UNet: `UNetConfig.digits()` — one channel, {blocks}, {u['layers_per_block']} layer per block,
  {u['attention_heads']} heads, cross-attention to a {u['cross_attention_dim']}-wide context; the same code and
  parameter names as the SD1.5 UNet.
- Prompt encoder: word-level tokenizer ({len(tk['vocab'])} words, {tk['max_length']} tokens with `<bos>`, `<eos>` and
  padding), a {te['layers']}-layer transformer of width {te['width']}.
- {tr['params']:,} parameters in all, stored as float32 safetensors (`model.safetensors`: `unet.*` and
  `text_encoder.*`).
- Parametrization: v-prediction with EDM preconditioning (sigma_data = 1): the network sees
  `x / sqrt(sigma^2 + 1)` and the timestep `{config['timestep_scale']:g} * ln(sigma) / 4`; the denoised estimate is
  `x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) * v`. Sampling uses Karras sigmas from {config['sigma_max']:g}
  to {config['sigma_min']:g} (rho {config['rho']:g}).

## Training
`{tr['command'].strip()}`: seed {tr['seed']}, {tr['iters']} iterations of batch {tr['batch_size']} (AdamW,
lr {tr['lr']:g} with {tr['warmup']} warm-up iterations and cosine decay, gradient clipping 1.0, EMA {tr['ema']}),
noise levels ln(sigma) ~ N({tr['p_mean']:g}, {tr['p_std']:g}^2), prompts from a small grammar with
{tr['p_uncond']:.0%} replaced by the empty prompt (classifier-free guidance). {tr['train_seconds']:.0f} s on a
shared 2-core CPU ({tr['threads']} torch threads, torch {tr['torch']}). Final training loss (mean of the last 200
iterations): {tr['final_train_loss']}; loss of the EMA weights on 4,096 fixed draws: {tr['ema_eval_loss']}.
Deterministic: the same seed, thread count and torch build give the same weights.

## Evaluation
{EVAL_BEGIN}
Run `python train/evaluate_digits.py --write-docs`.
{EVAL_END}

## Limits
8x8 grey digits only; the vocabulary is closed (an unknown word is an error that lists it). Prompts outside
the training grammar (e.g. two digits) give undefined results.
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iters", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--p-uncond", type=float, default=0.12)
    p.add_argument("--p-mean", type=float, default=-1.0)
    p.add_argument("--p-std", type=float, default=1.4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "diffusion_fast" / "weights" / "digits")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    x0_all, labels, mean, std = load_data()
    vocab = vocabulary()
    unet, text, tok = build(vocab)
    # Training runs the plain-PyTorch paths (same math as the ops' reference, with autograd kernels).
    unet.set_backend(group_norm="eager", attention="sdpa")
    text.set_backend(attention="sdpa")
    params = list(unet.parameters()) + list(text.parameters())
    n_params = sum(q.numel() for q in params)
    ema = [q.detach().clone() for q in params]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    sigma_min, sigma_max, timestep_scale = 0.002, 20.0, 1000.0
    empty = tok.encode("")

    print(f"digits: {len(x0_all)} images, mean {mean:.4f}, std {std:.4f}; params {n_params / 1e6:.3f}M; "
          f"vocab {len(vocab)} words; {args.iters} iters x batch {args.batch_size}", flush=True)
    t0 = time.time()
    losses = []
    for it in range(args.iters):
        lr = args.lr * min(1.0, (it + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * it / args.iters))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(len(x0_all), (args.batch_size,), generator=gen)
        x0, y = x0_all[idx], labels[idx]
        ids = torch.tensor([empty if rng.random() < args.p_uncond else tok.encode(random_prompt(int(d), rng))
                            for d in y], dtype=torch.long)
        sigma = torch.exp(args.p_mean + args.p_std * torch.randn(args.batch_size, generator=gen))
        noise = torch.randn(x0.shape, generator=gen)
        loss = v_loss(unet, text, x0, ids, sigma, noise, timestep_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + it) / (10 + it))
        with torch.no_grad():
            for e, q in zip(ema, params):
                e.lerp_(q.detach(), 1 - decay)
        losses.append(loss.item())
        if (it + 1) % 100 == 0 or it + 1 == args.iters:
            print(f"iter {it + 1:5d}  loss {np.mean(losses[-100:]):.4f}  lr {lr:.2e}  "
                  f"{time.time() - t0:6.1f}s", flush=True)
    train_time = time.time() - t0

    with torch.no_grad():
        for e, q in zip(ema, params):
            q.copy_(e)
        # A fixed evaluation loss of the EMA weights: 4096 draws from a generator of its own.
        eg = torch.Generator().manual_seed(12345)
        erng = np.random.default_rng(12345)
        tot = 0.0
        for _ in range(16):
            idx = torch.randint(len(x0_all), (256,), generator=eg)
            ids = torch.tensor([tok.encode(random_prompt(int(d), erng)) for d in labels[idx]], dtype=torch.long)
            sigma = torch.exp(args.p_mean + args.p_std * torch.randn(256, generator=eg))
            tot += v_loss(unet, text, x0_all[idx], ids, sigma, torch.randn(256, 1, 8, 8, generator=eg),
                          timestep_scale).item() / 16
    final = float(np.mean(losses[-200:]))
    print(f"done in {train_time:.0f}s: train loss (last 200 iters) {final:.4f}, EMA eval loss {tot:.4f}")

    args.out.mkdir(parents=True, exist_ok=True)
    tensors = {f"unet.{k}": v.contiguous() for k, v in unet.state_dict().items()}
    tensors.update({f"text_encoder.{k}": v.contiguous() for k, v in text.state_dict().items()})
    save_file(tensors, str(args.out / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "format": FORMAT,
        "name": "digits",
        "unet": unet.config.to_dict(),
        "text_encoder": text.config.to_dict(),
        "tokenizer": tok.to_dict(),
        "prediction": "v_prediction",
        "timestep_scale": timestep_scale,
        "sigma_min": sigma_min,
        "sigma_max": sigma_max,
        "rho": 7.0,
        "pixels": {"mean": mean, "std": std, "max_value": 16.0, "invert": True},
        "defaults": {"steps": 20, "guidance_scale": 2.0, "sampler": "dpmpp_2m"},
        "training": {
            "data": "sklearn.datasets.load_digits (1797 images, 8x8, 0..16)",
            "command": "python train/train_digits.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "seed": args.seed, "iters": args.iters, "batch_size": args.batch_size, "lr": args.lr,
            "warmup": args.warmup, "ema": args.ema, "p_uncond": args.p_uncond, "p_mean": args.p_mean,
            "p_std": args.p_std, "threads": args.threads, "params": n_params,
            "train_seconds": round(train_time, 1), "final_train_loss": round(final, 5),
            "ema_eval_loss": round(tot, 5), "torch": torch.__version__,
        },
    }
    (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (args.out / "MODEL_CARD.md").write_text(model_card(config))
    print(f"wrote {args.out / 'model.safetensors'} ({(args.out / 'model.safetensors').stat().st_size} bytes), "
          "config.json and MODEL_CARD.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
