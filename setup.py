"""Builds the compiled CPU kernels of the ``het_conv2d`` operator (``sparse_hetconv/csrc``) with the package.

The metadata lives in pyproject.toml; this file only adds the extension ``sparse_hetconv._C``:
the operator layer (``ops.cpp``, compiled for any x86-64 CPU) and the kernels twice, with AVX-512
and with AVX2 instructions (each file with its own flags), in one shared library that picks one at
run time. It is compiled against the installed torch's headers through PyTorch's stable ABI
(``TORCH_TARGET_VERSION`` 2.10: one binary for torch 2.10 and later) and uses no Python API, so
the wheel is tagged ``abi3``.

Torch must be importable while building: ``pip install --no-build-isolation .`` (the Makefile does
this; under pip's build isolation a second, multi-GB torch would be fetched, so build-system
requires only setuptools). Where torch is not importable, or no C++ compiler works, the package is
built without the kernels, installs as usual and runs the stock formulation;
``python -m sparse_hetconv.backends`` says which.
"""

import os
import platform
import sys
from concurrent.futures import ThreadPoolExecutor

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CSRC = os.path.join("sparse_hetconv", "csrc")
X86 = platform.machine().lower() in ("x86_64", "amd64")
COMMON = ["-O3", "-g0", "-std=c++17", "-fvisibility=hidden", "-fno-math-errno", "-Wno-ignored-attributes",
          "-DTORCH_TARGET_VERSION=0x020a000000000000"] + (["-DSHC_X86"] if X86 else [])
# Each instruction set's kernels, compiled with its own flags (never the operator layer).
ISA_SOURCES = {
    "kernels_avx512.cpp": ["-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq", "-mavx2", "-mfma"],
    "kernels_avx2.cpp": ["-mavx2", "-mfma"],
} if X86 else {}


def _torch_paths():
    """torch's include and library folders, or None where torch is not importable."""
    try:
        from torch.utils.cpp_extension import include_paths, library_paths
    except ImportError:
        return None
    return include_paths(), library_paths()


class BuildKernels(build_ext):
    """Compile every source of the extension with its own flags, in parallel, then link."""

    def build_extension(self, ext):
        sources = [os.path.join(CSRC, "ops.cpp")] + [os.path.join(CSRC, name) for name in ISA_SOURCES]
        flags = [COMMON] + [COMMON + isa for isa in ISA_SOURCES.values()]

        def compile_one(source_flags):
            source, extra = source_flags
            return self.compiler.compile([source], output_dir=self.build_temp, include_dirs=ext.include_dirs,
                                         extra_postargs=extra, depends=ext.depends)

        with ThreadPoolExecutor(max_workers=len(sources)) as pool:
            objects = [o for result in pool.map(compile_one, zip(sources, flags)) for o in result]
        self.compiler.link_shared_object(
            objects, self.get_ext_fullpath(ext.name), libraries=ext.libraries, library_dirs=ext.library_dirs,
            target_lang="c++")


paths = _torch_paths()
if paths is None:
    print("sparse_hetconv: torch is not importable in this build environment, so the package is built without "
          "its compiled CPU kernels (pip install --no-build-isolation . builds them)", file=sys.stderr)
    ext_modules, options = [], {}
else:
    ext_modules = [Extension(
        "sparse_hetconv._C", sources=[os.path.join(CSRC, "ops.cpp")], include_dirs=paths[0], library_dirs=paths[1],
        libraries=["torch_cpu"], depends=[os.path.join(CSRC, n) for n in ("kernels.h", "kernels_api.h")],
        language="c++", py_limited_api=True, optional=True)]
    options = {"bdist_wheel": {"py_limited_api": "cp310"}}

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildKernels}, options=options)
