"""The CUDA backend: hand-written kernels in csrc/, bound with pybind11 as ``diffusion_fast._C``.

The extension includes no torch headers: each ``<op>.py`` here passes ``tensor.data_ptr()``, sizes, strides
and ``torch.cuda.current_stream().cuda_stream`` to it, so one build works with any torch version and inside
CUDA graphs. The extension is loaded on first use (see :mod:`._ext`).
"""
