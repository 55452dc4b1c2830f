"""Ahead-of-time compilation of the Triton kernels for sm_80 and sm_90 on a machine without a GPU.

Triton builds PTX and a cubin for any ``GPUTarget`` without a device. For each kernel configuration that
the host code may launch, this module compiles it, reads the cubin's resources with the ``cuobjdump``
bundled in Triton (``REG``, ``STACK``, ``LOCAL``; a non-zero stack frame or local memory in these call-free
kernels means register spills), adds the dynamic shared memory from the compile metadata, and checks the
PTX for ``wgmma`` (Hopper's asynchronous warpgroup MMA) where the attention tiles allow it.

Run it as a program (kernels must be real JIT functions, so never under ``TRITON_INTERPRET=1``)::

    python benchmarks/triton_aot.py                 # representative set, both targets
    python benchmarks/triton_aot.py --full --table  # the wide set, as a Markdown table

``--json PATH`` writes one record per compiled configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

# Largest dynamic shared memory one block may use (opt-in): A100 163 KB, H100 227 KB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
TARGETS = (80, 90)


@dataclass(frozen=True)
class Job:
    """One kernel configuration to compile for one target."""

    op: str
    module: str  # e.g. "diffusion_fast.kernels.triton.attention"
    kernel: str  # attribute name of the @triton.jit function in that module
    arch: int
    types: tuple[tuple[str, str], ...]  # non-i32 runtime args: ("q_ptr", "*fp16"), ("eps", "fp32")
    constexprs: tuple[tuple[str, object], ...]
    divisible: tuple[str, ...]  # runtime args specialised as multiples of 16, as the JIT does for such values
    num_warps: int
    num_stages: int
    label: str
    expect_wgmma: bool = False


@dataclass
class Result:
    op: str
    label: str
    arch: int
    num_warps: int
    num_stages: int
    ok: bool = False
    error: str = ""
    regs: int = -1
    stack: int = -1
    local: int = -1
    shared: int = -1  # dynamic (metadata) + static (cubin) bytes
    wgmma: bool = False
    expect_wgmma: bool = False
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_job(job: Job) -> Result:
    """Compile ``job`` and read back its resources; never raises (errors land in ``Result.error``)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    res = Result(job.op, job.label, job.arch, job.num_warps, job.num_stages, expect_wgmma=job.expect_wgmma)
    t0 = time.time()
    try:
        fn = getattr(importlib.import_module(job.module), job.kernel)
        if not isinstance(fn, triton.runtime.JITFunction):
            raise RuntimeError(f"{job.kernel} is not a JIT function (is TRITON_INTERPRET set?)")
        types = dict(job.types)
        consts = dict(job.constexprs)
        sig, attrs = {}, {}
        for i, p in enumerate(fn.params):
            if p.is_constexpr:
                sig[p.name] = "constexpr"
            else:
                sig[p.name] = types.get(p.name, "i32")
                if p.name in job.divisible:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        missing = [p.name for p in fn.params if p.is_constexpr and p.name not in consts]
        if missing:
            raise RuntimeError(f"constexpr values missing: {missing}")
        src = ASTSource(fn, sig, consts, attrs)
        k = triton.compile(src, target=GPUTarget("cuda", job.arch, 32),
                           options={"num_warps": job.num_warps, "num_stages": job.num_stages})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            dump = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True,
                                  text=True, check=True).stdout
        line = next(ln for ln in dump.splitlines() if "REG:" in ln)
        field_of = lambda name: int(re.search(rf"\b{name}:(\d+)", line).group(1))
        res.regs, res.stack, res.local = field_of("REG"), field_of("STACK"), field_of("LOCAL")
        res.shared = int(k.metadata.shared) + field_of("SHARED")
        res.wgmma = "wgmma" in k.asm["ptx"]
        res.ok = True
    except Exception as exc:  # reported, and the test fails on it
        res.error = f"{type(exc).__name__}: {str(exc)[:400]}"
    res.seconds = round(time.time() - t0, 2)
    if not res.ok:
        res.problems.append(f"does not compile: {res.error}")
    else:
        if res.shared > SHARED_LIMIT[job.arch]:
            res.problems.append(f"shared memory {res.shared} B > sm_{job.arch} limit {SHARED_LIMIT[job.arch]} B")
        if res.stack > 0 or res.local > 0:
            res.problems.append(f"register spills (stack frame {res.stack} B, local {res.local} B)")
        if job.expect_wgmma and not res.wgmma:
            res.problems.append("PTX has no wgmma")
    return res


# ---------------------------------------------------------------------------------------------------------
# Which configurations exist. "CI" sets are representative (every tile/warp configuration the host code may
# pick, for the head dims and channel counts that give distinct code); "full" widens dtypes, head dims,
# key counts and flags.

_TT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
_ATTN_STRIDES = ("sqb", "sqs", "sqh", "skb", "sks", "skh", "svb", "svs", "svh", "sob", "sos", "soh")


def attention_jobs(arch: int, full: bool) -> list[Job]:
    import torch

    from diffusion_fast.kernels.triton import attention as A

    jobs: list[Job] = []

    def add(dtype, D, Sk, cfg):
        da, db = A.split_head_dim(D, split=A.SPLIT_ON_GPU)  # what the compiled kernels run
        bn, tail, _, short = A.key_tiles(Sk, cfg.block_n)
        tt = _TT[str(dtype).replace("torch.", "")]
        lowp = dtype != torch.float32
        jobs.append(Job(
            "attention", A.__name__, "_attention_fwd_kernel", arch,
            types=tuple((p, "*" + tt) for p in ("q_ptr", "k_ptr", "v_ptr", "o_ptr")) + (("qk_scale", "fp32"),),
            constexprs=(("HEAD_DIM", D), ("D_A", da), ("D_B", db), ("BLOCK_M", cfg.block_m), ("BLOCK_N", bn),
                        ("BLOCK_TAIL", tail), ("SHORT", short), ("IEEE", not lowp)),
            divisible=("q_ptr", "k_ptr", "v_ptr", "o_ptr") + _ATTN_STRIDES,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            label=f"{tt} D={D} Sk={Sk} M{cfg.block_m} N{bn}+{tail} w{cfg.num_warps} s{cfg.num_stages}",
            expect_wgmma=arch >= 90 and lowp and cfg.block_m >= 64 and cfg.num_warps % 4 == 0,
        ))

    if full:
        dims = (8, 32, 40, 48, 64, 72, 96, 128, 136, 160, 192, 256)
        for D in dims:
            for dtype in (torch.float16, torch.bfloat16) if D in (64, 128) else (torch.float16,):
                for Sk in (1000, 1024, 8, 77, 100, 128):
                    for cfg in A.candidate_configs(D, dtype, Sk, arch):
                        add(dtype, D, Sk, cfg)
            for Sk in (1000, 77):
                for cfg in A.candidate_configs(D, torch.float32, Sk, arch):
                    add(torch.float32, D, Sk, cfg)
        return jobs
    for D in (40, 80, 160, 256):  # one head dim per class of D_A + D_B: 64, 128, 192, 256
        for Sk in (1000, 77):
            for cfg in A.candidate_configs(D, torch.float16, Sk, arch):
                add(torch.float16, D, Sk, cfg)
    for D in (64, 128):
        add(torch.bfloat16, D, 4096, A.candidate_configs(D, torch.bfloat16, 4096, arch)[0])
    for cfg in A.candidate_configs(40, torch.float32, 1000, arch):
        add(torch.float32, 40, 1000, cfg)
    return jobs


def group_norm_jobs(arch: int, full: bool) -> list[Job]:
    from diffusion_fast.kernels.triton import group_norm as GN

    jobs: list[Job] = []

    def add(tt, CG, cl, flags, split_pad):
        has_add, affine, silu = flags
        p = GN.plan(1, 32, CG, 64 * 64, target_programs=528, tile=GN._COMPILED_TILE)
        common = dict(CG=CG, BLOCK_C=p.block_c, BLOCK_S=p.block_s, CHANNELS_LAST=cl, HAS_ADD=has_add)
        tag = f"{tt} CG={CG} {'NHWC' if cl else 'NCHW'} add={int(has_add)} tile={p.block_c}x{p.block_s}"
        jobs.append(Job("group_norm", GN.__name__, "_group_norm_stats_kernel", arch,
                        types=(("x_ptr", "*" + tt), ("add_ptr", "*" + tt), ("part_ptr", "*fp32")),
                        constexprs=tuple(common.items()),
                        divisible=("x_ptr", "add_ptr", "part_ptr", "C", "S", "CHUNK_S", "add_sn"),
                        num_warps=p.num_warps, num_stages=1, label="stats " + tag))
        jobs.append(Job("group_norm", GN.__name__, "_group_norm_apply_kernel", arch,
                        types=(("x_ptr", "*" + tt), ("y_ptr", "*" + tt), ("w_ptr", "*fp32"), ("b_ptr", "*fp32"),
                               ("add_ptr", "*" + tt), ("part_ptr", "*fp32"), ("eps", "fp32")),
                        constexprs=tuple(common.items()) + (("SPLIT_PAD", split_pad), ("HAS_AFFINE", affine),
                                                            ("SILU", silu)),
                        divisible=("x_ptr", "y_ptr", "w_ptr", "b_ptr", "add_ptr", "part_ptr", "C", "S",
                                   "CHUNK_S", "add_sn"),
                        num_warps=p.num_warps, num_stages=1,
                        label=f"apply {tag} affine={int(affine)} silu={int(silu)} split_pad={split_pad}"))

    if full:
        for tt in ("fp32", "fp16", "bf16"):
            for CG in (1, 3, 10, 20, 40, 64, 80, 160, 640, 5120):
                for cl in (False, True):
                    for flags in ((True, True, True), (False, False, False)):
                        for sp in (1, 32, 1024):
                            add(tt, CG, cl, flags, sp)
        return jobs
    for CG in (10, 40):
        for cl in (False, True):
            add("bf16", CG, cl, (True, True, True), 32)
    add("fp32", 1, False, (False, False, False), 1)
    add("fp16", 5120, True, (False, True, True), 1024)
    return jobs


def sampler_step_jobs(arch: int, full: bool) -> list[Job]:
    from diffusion_fast.kernels.triton import sampler_step as SS
    from diffusion_fast.ops.rows import AD, AH, AX, AZ, BD, BX, CIN, G, P, Q

    index = (("I_G", G), ("I_P", P), ("I_Q", Q), ("I_AX", AX), ("I_AD", AD), ("I_AZ", AZ), ("I_BX", BX),
             ("I_BD", BD), ("I_CIN", CIN), ("I_AH", AH))
    jobs: list[Job] = []

    def add(K, cfg_flag, noise, net, net_cfg, mo, cfg):
        jobs.append(Job(
            "sampler_step", SS.__name__, "_sampler_step_kernel", arch,
            types=(("x_ptr", "*fp32"), ("mo_ptr", "*" + mo), ("coef_ptr", "*fp32"), ("slots_ptr", "*i64"),
                   ("hist_ptr", "*fp32"), ("noise_ptr", "*fp32"), ("out_ptr", "*fp32"), ("net_ptr", "*" + mo)),
            constexprs=(("K", K), ("CFG", cfg_flag), ("HAS_NOISE", noise), ("HAS_NET", net), ("NET_CFG", net_cfg),
                        ("BLOCK", cfg.block)) + index,
            divisible=("x_ptr", "mo_ptr", "coef_ptr", "slots_ptr", "hist_ptr", "noise_ptr", "out_ptr", "net_ptr",
                       "n"),
            num_warps=cfg.num_warps, num_stages=1,
            label=f"K={K} cfg={int(cfg_flag)} noise={int(noise)} net={int(net)}{'x2' if net_cfg else ''} "
                  f"{mo} BLOCK={cfg.block}",
        ))

    if full:
        for cfg in SS.configs():
            for mo in ("fp32", "bf16"):
                for K in range(0, 9):
                    for cf in (False, True):
                        for noise in (False, True):
                            for net, net_cfg in ((False, False), (True, False), (True, True)):
                                add(K, cf, noise, net, net_cfg, mo, cfg)
        return jobs
    for cfg in SS.configs():
        for K in (0, 1, 3, 8):
            add(K, True, True, True, True, "bf16", cfg)
    add(0, False, False, False, False, "fp32", SS.configs()[0])
    return jobs


def all_jobs(arches=TARGETS, full: bool = False, ops=("group_norm", "attention", "sampler_step")) -> list[Job]:
    makers = {"group_norm": group_norm_jobs, "attention": attention_jobs, "sampler_step": sampler_step_jobs}
    return [j for arch in arches for op in ops for j in makers[op](arch, full)]


def run(jobs: list[Job], workers: int = 1) -> list[Result]:
    if workers <= 1:
        return [compile_job(j) for j in jobs]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(compile_job, jobs, chunksize=1))


def table(results: list[Result]) -> str:
    """Markdown table of the resources per configuration."""
    rows = ["| op | target | configuration | regs | shared (B) | spill (stack/local B) | wgmma | ok |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        rows.append(f"| {r.op} | sm_{r.arch} | {r.label} | {r.regs} | {r.shared} | {r.stack}/{r.local} | "
                    f"{'yes' if r.wgmma else 'no'} | {'yes' if not r.problems else '; '.join(r.problems)} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="the wide set instead of the representative one")
    ap.add_argument("--arch", default="80,90", help="comma-separated compute capabilities (default 80,90)")
    ap.add_argument("--op", default="group_norm,attention,sampler_step")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--json", help="write the records here")
    ap.add_argument("--table", action="store_true", help="print a Markdown table")
    args = ap.parse_args(argv)
    from diffusion_fast.kernels.triton._common import INTERPRET

    if INTERPRET:
        print("unset TRITON_INTERPRET: ahead-of-time compilation needs the real JIT functions", file=sys.stderr)
        return 2
    jobs = all_jobs(tuple(int(a) for a in args.arch.split(",")), args.full, tuple(args.op.split(",")))
    t0 = time.time()
    results = run(jobs, args.workers)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    if args.table:
        print(table(results))
    bad = [r for r in results if r.problems]
    print(f"{len(results)} configurations compiled in {time.time() - t0:.0f} s, {len(bad)} with problems",
          file=sys.stderr)
    for r in bad:
        print(f"  {r.op} sm_{r.arch} {r.label}: {'; '.join(r.problems)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
