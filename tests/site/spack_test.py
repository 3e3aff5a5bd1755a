#!/usr/bin/env python3
# tests/site/spack_test.py: the Spack recipe (packaging/spack/package.py) agrees with the CMake files,
# read without Spack (python's ast on the recipe, regular expressions on the CMake files):
# - every variant, CudaPackage's `cuda` and `cuda_arch` included, reaches cmake_args;
# - every CMake variable the recipe sets is one the CMake files declare (option(), set(... CACHE)) or
#   read (CUDAToolkit_ROOT, CMAKE_CUDA_ARCHITECTURES, DNNL_ROOT, BUILD_TESTING);
# - a boolean variant maps (define_from_variant: ON/OFF) only to an option that accepts ON and OFF;
# - every project option is set by the recipe or named below with the reason it is not;
# - the dependencies match: cmake's minimum version, hwloc's, the pkg-config modules, oneDNN 2.x,
#   cmocka only with +tests, NCCL only with +nccl and at the CMake minimum.
# Usage: spack_test.py <source dir>
import ast
import glob
import os
import re
import sys

# Project options the recipe leaves alone, and why (a new option must be mapped or named here).
NOT_MAPPED = {
    "DSMOE_SANITIZE": "developer builds with sanitizers, not an installation",
    "DSMOE_FUZZ": "developer builds of the fuzz targets",
    "DSMOE_FUZZ_SECONDS": "the fuzz tests' duration",
    "DSMOE_MPIEXEC": "the launcher of the test suite: FindMPI's default is right in a Spack build",
    "DSMOE_MPIEXEC_PREFLAGS": "the launcher flags of the test suite",
}
# Variables of CMake or of find modules the recipe may set, if the project's CMake files read them.
READ_NOT_DECLARED = {"CUDAToolkit_ROOT", "CMAKE_CUDA_ARCHITECTURES", "DNNL_ROOT", "BUILD_TESTING"}

failures = []
passed = 0


def check(cond, msg):
    global passed
    if cond:
        passed += 1
    else:
        failures.append(msg)
        print("FAIL:", msg)


def const(node):
    return node.value if isinstance(node, ast.Constant) else None


def calls(tree, name):
    """Calls of a plain function `name(...)` or a method `x.name(...)` anywhere in tree."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if (isinstance(f, ast.Name) and f.id == name) or (isinstance(f, ast.Attribute) and f.attr == name):
                yield node


def kwarg(call, name):
    for k in call.keywords:
        if k.arg == name:
            return k.value
    return None


def cmake_files(src):
    files = [os.path.join(src, "CMakeLists.txt")] + glob.glob(os.path.join(src, "cmake", "*.cmake"))
    for d in ("core", "plugins", "backends", "kernels", "tests", "bench"):
        files += glob.glob(os.path.join(src, d, "**", "CMakeLists.txt"), recursive=True)
    files += glob.glob(os.path.join(src, "tests", "*.cmake"))
    return sorted(set(f for f in files if os.path.isfile(f)))


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else "."
    recipe = os.path.join(src, "packaging", "spack", "package.py")
    tree = ast.parse(open(recipe).read(), recipe)
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef)]
    check(len(classes) == 1 and classes[0].name == "Dsmoe", f"{recipe}: expected one class Dsmoe")
    cls = classes[0]
    bases = {b.id for b in cls.bases if isinstance(b, ast.Name)}
    check({"CMakePackage", "CudaPackage"} <= bases, f"Dsmoe's bases {sorted(bases)}: expected CMakePackage, CudaPackage")

    # --- the recipe's side ---
    variants = {}  # name -> default
    for c in calls(cls, "variant"):
        variants[const(c.args[0])] = const(kwarg(c, "default"))
    if "CudaPackage" in bases:
        variants.setdefault("cuda", False)
        variants.setdefault("cuda_arch", "none")
    cmake_args = [f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == "cmake_args"]
    check(len(cmake_args) == 1, "no cmake_args method")
    body = cmake_args[0]
    defines = {}  # CMake variable -> variant it comes from (define_from_variant) or None (define)
    for c in calls(body, "define_from_variant"):
        defines[const(c.args[0])] = const(c.args[1])
    for c in calls(body, "define"):
        defines.setdefault(const(c.args[0]), None)
    check(None not in defines, "a CMake variable in cmake_args is not a string constant")
    strings = {const(n) for n in ast.walk(body) if isinstance(const(n), str)}
    for v in variants:
        used = v in defines.values() or v in strings or any(s in strings for s in ("+" + v, "~" + v))
        check(used, f"variant '{v}' does not reach cmake_args")

    deps = {}  # package name -> list of (spec, when)
    for c in calls(cls, "depends_on"):
        spec = const(c.args[0])
        when = const(kwarg(c, "when")) or ""
        name = re.match(r"[A-Za-z0-9_-]+", spec).group(0)
        deps.setdefault(name, []).append((spec, when))
    conflicts = [(const(c.args[0]), const(kwarg(c, "when")) or "") for c in calls(cls, "conflicts")]

    # --- the CMake side ---
    declared = {}  # option -> (file, text of the declaration and its STRINGS property)
    text_all = ""
    for f in cmake_files(src):
        text = open(f).read()
        text_all += text
        for m in re.finditer(r"^\s*option\(\s*([A-Za-z0-9_]+)", text, re.M):
            declared[m.group(1)] = (f, "ON OFF")
        for m in re.finditer(r"^\s*set\(\s*([A-Za-z0-9_]+)\s[^)]*\bCACHE\s+(STRING|BOOL|PATH|FILEPATH)\b", text, re.M):
            strings_prop = re.search(r"set_property\(\s*CACHE\s+%s\s+PROPERTY\s+STRINGS\s+([^)]*)\)" % m.group(1), text)
            kind = m.group(2)
            declared.setdefault(m.group(1), (f, strings_prop.group(1) if strings_prop else ("ON OFF" if kind == "BOOL" else "")))
    check(len(declared) >= 5, f"found only {sorted(declared)} options in the CMake files")

    for var, variant in defines.items():
        if var in READ_NOT_DECLARED:
            check(re.search(r"\b%s\b" % re.escape(var), text_all) is not None,
                  f"the recipe sets {var}, which no CMake file of the project reads")
            continue
        check(var in declared, f"the recipe sets {var}, which no CMake file declares (option() or set(... CACHE))")
        if var in declared and variant is not None and isinstance(variants.get(variant), bool):
            accepts = declared[var][1].split()
            check("ON" in accepts and "OFF" in accepts,
                  f"{var} gets ON/OFF from variant '{variant}' but is declared with values {accepts} ({declared[var][0]})")
    for opt, (f, _) in sorted(declared.items()):
        if opt.startswith("DSMOE_"):
            check(opt in defines or opt in NOT_MAPPED,
                  f"option {opt} ({os.path.relpath(f, src)}) is neither set by the recipe nor named in NOT_MAPPED")
    for opt in NOT_MAPPED:
        check(opt in declared, f"NOT_MAPPED names {opt}, which no CMake file declares any more")
    check(defines.get("BUILD_TESTING") == "tests", "BUILD_TESTING must come from the `tests` variant")

    # --- dependencies against the CMake files ---
    m = re.search(r"cmake_minimum_required\(VERSION\s+([0-9.]+)", open(os.path.join(src, "CMakeLists.txt")).read())
    check(m and any(s.startswith(f"cmake@{m.group(1)}:") for s, _ in deps.get("cmake", [])),
          f"cmake dependency {deps.get('cmake')} does not match cmake_minimum_required({m and m.group(1)})")
    m = re.search(r"pkg_check_modules\(HWLOC[^)]*hwloc>=([0-9]+)", text_all)
    check(m and any(s.startswith(f"hwloc@{m.group(1)}") for s, _ in deps.get("hwloc", [])),
          f"hwloc dependency {deps.get('hwloc')} does not match the CMake minimum hwloc>={m and m.group(1)}")
    for module, package in (("openblas", "openblas"), ("cmocka", "cmocka")):
        if re.search(r"pkg_check_modules\([A-Z]+\s[^)]*\b%s\b" % module, text_all):
            check(package in deps, f"the CMake files use pkg-config module {module}, the recipe has no {package}")
    check("mpi" in deps and deps["mpi"][0][1] == "", "the recipe must depend on the virtual mpi always")
    check(all(w == "+tests" for _, w in deps.get("cmocka", [("", "")])), "cmocka must be a dependency with +tests only")
    check(all(w == "+nccl" for _, w in deps.get("nccl", [("", "")])), "nccl must be a dependency with +nccl only")
    m = re.search(r"DSMOE_NCCL_VERSION VERSION_LESS ([0-9.]+)\)", text_all)
    check(m and any(s == f"nccl@{m.group(1)}:" for s, _ in deps.get("nccl", [])),
          f"nccl dependency {deps.get('nccl')} does not match the CMake minimum NCCL {m and m.group(1)}")
    m = re.search(r"dnnl_version VERSION_LESS ([0-9]+)\.0", text_all)
    if m:  # the cpu plugin takes oneDNN below that major version only
        below = int(m.group(1))
        major = below - 1  # onednn@2, onednn@2.6, onednn@2:2.9 ...
        check(any(re.fullmatch(r"onednn@%d(\.[0-9]+)*(:%d(\.[0-9]+)*)?" % (major, major), s)
                  for s, w in deps.get("onednn", []) if w == "+onednn"),
              f"onednn dependency {deps.get('onednn')}: the cpu plugin needs oneDNN {below - 1}.x")
    # +nccl: refused while backends/nccl does not exist, and never without +cuda.
    if not os.path.isdir(os.path.join(src, "backends", "nccl")):
        check(("+nccl", "") in conflicts, "backends/nccl does not exist: the recipe must refuse +nccl (conflicts)")
    check(("+nccl", "~cuda") in conflicts, "+nccl without +cuda must be a conflict")

    print(f"spack recipe: {passed} passed, {len(failures)} failed")
    sys.exit(1 if failures else 0)


main()
