"""Do the digits model's images depend on the batch they are made in? Plain batched calls vs batch_invariant().

Makes 24 images (each from its own generator) in batches of 1, 2, 3, 5, 8 and 24 and prints, for each batch size,
how many of the 24 final float32 samples are bit-identical to the batch-of-1 run. Run it on the machine (and with
the thread count) you care about, e.g. also with ``ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2`` or
``ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2``.

    python benchmarks/batch_invariance.py [--threads 1] [--steps 6]
"""

import argparse
import contextlib

import torch

from diffusion_fast import Pipeline
from diffusion_fast.batch import batch_invariant

SIZES = (1, 2, 3, 5, 8, 24)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = Pipeline.from_pretrained("digits")
    prompts = [str(i % 10) for i in range(24)]

    def run(bs: int, ctx) -> torch.Tensor:
        out = []
        for s in range(0, len(prompts), bs):
            part = prompts[s:s + bs]
            gens = [torch.Generator().manual_seed(100 + s + j) for j in range(len(part))]
            with ctx(), torch.no_grad():
                out.append(pipe(part, steps=args.steps, sampler="euler_ancestral", generator=gens,
                                progress=False).samples)
        return torch.cat(out)

    print(f"torch {torch.__version__}, {args.threads} thread(s), {torch.backends.cpu.get_cpu_capability()}")
    for name, ctx in (("plain", contextlib.nullcontext), ("batch_invariant", batch_invariant)):
        res = {bs: run(bs, ctx) for bs in SIZES}
        same = [sum(torch.equal(res[1][i], res[bs][i]) for i in range(len(prompts))) for bs in SIZES]
        print(f"{name:16s} images equal to batch 1, for batch sizes {SIZES}: {same} of {len(prompts)}")


if __name__ == "__main__":
    main()
