# packaging/spack/package.py: a Spack recipe for dsmoe. Copy it to packages/dsmoe/package.py of a Spack
# package repository (docs/install.md: how, and what was and was not checked). tests/site/spack_test.py
# checks that its variants and the CMake options it sets agree with the CMake files.
#
# Copyright dsmoe developers. SPDX-License-Identifier: (Apache-2.0 OR MIT)

from spack.package import *


class Dsmoe(CMakePackage, CudaPackage):
    """Mixture-of-Experts GPT training (DeepSpeed-MoE) for MPI clusters: an MPI program in C whose compute
    and communication are plugins loaded at run time (CPU: OpenMP, OpenBLAS and optionally oneDNN for
    bfloat16; NVIDIA GPUs: CUDA and cuBLAS)."""

    # dsmoe has no public release address yet: build a checkout with
    #   spack develop --path /path/to/dsmoe dsmoe@=0.1.0 && spack install
    # A site that mirrors dsmoe adds `git = "<its address>"` and `version("main", branch="main")`.
    version("0.1.0")

    # --- variants (CudaPackage adds `cuda` and `cuda_arch`) --------------------------------------------
    variant("onednn", default=True, description="bfloat16 GEMMs of the cpu kernel plugin through oneDNN "
            "(without it they are emulated, slowly)")
    variant("nccl", default=False, description="the NCCL comm plugin (needs +cuda)")
    variant("tests", default=False, description="build the test suite (cmocka) and run it with --test=root")
    variant(
        "cpu_arch",
        default="x86-64-v3",
        values=lambda v: bool(v) and " " not in v,
        multi=False,
        description="-march of the cpu plugin's kernels (x86-64-v3: AVX2 + FMA), or native",
    )

    # --- dependencies ------------------------------------------------------------------------------------
    depends_on("c", type="build")
    depends_on("cxx", type="build", when="+tests")  # the tests compile the plugin headers as C++ too
    depends_on("cmake@3.25:", type="build")
    depends_on("pkgconfig", type="build")
    depends_on("mpi")
    depends_on("hwloc@2:")
    # The cpu plugin finds its BLAS as pkg-config's `openblas` (plugins/cpu/CMakeLists.txt), so the
    # virtual `blas` would not do: another BLAS needs a change to the CMake files first.
    depends_on("openblas")
    depends_on("onednn@2", when="+onednn")  # the cpu plugin speaks oneDNN's 2.x C API
    depends_on("nccl@2.14:", when="+nccl")  # non-blocking communicators (cmake/dsmoeGpu.cmake)
    depends_on("cmocka", type=("build", "link"), when="+tests")

    conflicts("cuda_arch=none", when="+cuda", msg="name the GPU architectures: cuda_arch=80,90 (A100, H100/H200)")
    conflicts("+nccl", when="~cuda", msg="the NCCL comm plugin needs +cuda")
    conflicts("target=aarch64:", when="cpu_arch=x86-64-v3", msg="cpu_arch=x86-64-v3 is an x86 level: "
              "give the -march of this CPU, e.g. cpu_arch=armv8.4-a or cpu_arch=native")

    def cmake_args(self):
        spec = self.spec
        args = [
            self.define("DSMOE_CPU_ARCH", spec.variants["cpu_arch"].value),
            # ON or OFF, never AUTO: Spack decides what is built, not what the build machine has.
            self.define_from_variant("DSMOE_WITH_CUDA", "cuda"),
            self.define_from_variant("DSMOE_WITH_NCCL", "nccl"),
            self.define_from_variant("DSMOE_WITH_ONEDNN", "onednn"),
            self.define_from_variant("BUILD_TESTING", "tests"),
        ]
        if spec.satisfies("+onednn"):
            args.append(self.define("DNNL_ROOT", spec["onednn"].prefix))
        if spec.satisfies("+cuda"):
            args.append(self.define("CUDAToolkit_ROOT", spec["cuda"].prefix))
            args.append(self.define("CMAKE_CUDA_ARCHITECTURES", spec.variants["cuda_arch"].value))
        return args

    def setup_run_environment(self, env):
        # What the modulefiles cmake --install writes set as well (packaging/modulefiles).
        env.set("DSMOE_ROOT", self.prefix)
        env.set("DSMOE_PLUGIN_DIR", self.prefix.lib.dsmoe)
