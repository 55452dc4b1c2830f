"""Build script. The pure-Python package always installs; the CUDA extension ``diffusion_fast._C`` (csrc/) is
compiled with nvcc when nvcc is found.

Environment:
    DIFFUSION_FAST_BUILD_CUDA   unset: build when nvcc is found; ``0``: never; ``1``: always (fail without nvcc)
    DIFFUSION_FAST_CUDA_ARCH    architectures to compile for, e.g. ``90a`` or ``80;90a`` (default
                                ``80;86;89;90a``; ``90a`` is the Hopper target with wgmma/setmaxnreg)
    CUDA_HOME / CUDA_PATH       the CUDA toolkit (default: where ``nvcc`` on PATH lives, else /usr/local/cuda)
    DIFFUSION_FAST_NVCC_THREADS parallel nvcc jobs (default: the number of CPUs)

The kernels include no torch headers and the CUDA runtime is linked statically, so one build works with
any torch version and the module imports on a machine without a GPU or CUDA runtime libraries.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
DEFAULT_ARCHS = ("80", "86", "89", "90a")


def _notice(msg: str) -> None:
    print(f"diffusion_fast setup: {msg}", file=sys.stderr)


def find_nvcc() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    nvcc = shutil.which("nvcc")
    if nvcc:
        return nvcc
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.exists() else None


def cuda_lib_dir(nvcc: str) -> Path:
    """The toolkit directory holding libcudart_static.a."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
             str(Path(os.path.realpath(nvcc)).parent.parent), "/usr/local/cuda"]
    # nvcc may be a wrapper script (exec /usr/local/cuda-X/bin/nvcc): ask it where the toolkit is.
    try:
        out = subprocess.run([nvcc, "--dryrun", "--version"], capture_output=True, text=True, timeout=30)
        m = re.search(r"TOP=(\S+)", out.stdout + out.stderr)
        if m:
            homes.insert(0, m.group(1))
    except (OSError, subprocess.SubprocessError):
        pass
    for home in homes:
        if not home:
            continue
        for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
            if (Path(home) / sub / "libcudart_static.a").exists():
                return Path(home) / sub
    raise RuntimeError("libcudart_static.a not found in the CUDA toolkit; set CUDA_HOME")


def parse_archs(spec: str | None) -> list[str]:
    """``"90a"``, ``"8.0 9.0a"``, ``"sm_80,sm_90a"`` -> ``["80", "90a"]``."""
    if not spec:
        return list(DEFAULT_ARCHS)
    archs = []
    for tok in re.split(r"[\s,;]+", spec.strip()):
        if not tok:
            continue
        a = tok.lower().removeprefix("sm_").removeprefix("compute_").replace(".", "")
        if not re.fullmatch(r"\d{2,3}[af]?", a):
            raise ValueError(f"DIFFUSION_FAST_CUDA_ARCH: cannot read architecture {tok!r} (e.g. 80, 86, 90a)")
        archs.append(a)
    return archs


def gencode_flags(archs: list[str]) -> list[str]:
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]


NVCC_FLAGS = ["-O3", "-std=c++17", "-lineinfo", "-DNDEBUG", "-Xcompiler", "-fPIC",
              "-Xcompiler", "-fvisibility=hidden"]


class CudaBuildExt(build_ext):
    """Compiles the .cu sources with nvcc and bindings.cpp with the host compiler, all in parallel, then
    links them with the static CUDA runtime."""

    def build_extension(self, ext: Extension) -> None:
        nvcc = ext.nvcc  # type: ignore[attr-defined]
        archs = ext.archs  # type: ignore[attr-defined]
        build_temp = Path(self.build_temp) / "csrc"
        build_temp.mkdir(parents=True, exist_ok=True)
        import pybind11

        arch_macro = "-DDF_CUDA_ARCHS=\"" + " ".join(f"sm_{a}" for a in archs) + "\""
        cu_sources = sorted(CSRC.glob("*.cu"))
        jobs = int(os.environ.get("DIFFUSION_FAST_NVCC_THREADS", "0")) or (os.cpu_count() or 1)

        def compile_cu(src: Path) -> str:
            obj = build_temp / (src.stem + ".o")
            cmd = [nvcc, "-c", str(src), "-o", str(obj), *NVCC_FLAGS, *gencode_flags(archs), f"-I{CSRC}"]
            _notice("nvcc " + src.name + " (" + ", ".join(f"sm_{a}" for a in archs) + ")")
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"nvcc failed on {src.name}:\n{' '.join(cmd)}\n{res.stdout}{res.stderr}")
            return str(obj)

        def compile_cpp() -> list[str]:
            return self.compiler.compile(
                [str(CSRC / "bindings.cpp")], output_dir=str(build_temp / "host"),
                include_dirs=[pybind11.get_include(), str(CSRC), *self.include_dirs],
                extra_postargs=["-O2", "-std=c++17", "-fvisibility=hidden", arch_macro])

        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            host = pool.submit(compile_cpp)
            cu = [pool.submit(compile_cu, s) for s in cu_sources]
            objects = [f.result() for f in cu] + host.result()

        out = self.get_ext_fullpath(ext.name)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        libdir = cuda_lib_dir(nvcc)
        self.compiler.link_shared_object(
            objects, out, library_dirs=[str(libdir)],
            libraries=["cudart_static", "rt", "pthread", "dl"],
            extra_postargs=["-Wl,--exclude-libs,ALL"], target_lang="c++")


def cuda_extension() -> list[Extension]:
    mode = os.environ.get("DIFFUSION_FAST_BUILD_CUDA", "").strip()
    if mode == "0":
        _notice("CUDA extension skipped (DIFFUSION_FAST_BUILD_CUDA=0); installing the pure-Python package")
        return []
    nvcc = find_nvcc()
    if nvcc is None:
        if mode == "1":
            raise RuntimeError("DIFFUSION_FAST_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME or PATH)")
        _notice("nvcc not found: installing without the CUDA extension (the cuda backend will be unavailable)")
        return []
    ext = Extension("diffusion_fast._C", sources=[str((CSRC / "bindings.cpp").relative_to(ROOT))],
                    depends=[str(p.relative_to(ROOT)) for p in sorted(CSRC.iterdir())])
    ext.nvcc = nvcc  # type: ignore[attr-defined]
    ext.archs = parse_archs(os.environ.get("DIFFUSION_FAST_CUDA_ARCH"))  # type: ignore[attr-defined]
    return [ext]


setup(ext_modules=cuda_extension(), cmdclass={"build_ext": CudaBuildExt})
