"""Building libldmrt, the C++ Engine, for C++ hosts (`python -m ldmrt.cpp build`).

libldmrt runs AOTInductor engines with libtorch, so it must be compiled against the torch installed here
(the engines are tied to that torch too). pip cannot do it when installing ldmrt (its isolated build has
no torch, and a torch downloaded for the build could differ from the one installed), so it is built on
demand, with cmake and the C++ compiler, into a prefix keyed by the ldmrt and torch versions:

    python -m ldmrt.cpp build              # once per ldmrt/torch version; prints the prefix
    cmake -S examples/cpp -B build -DCMAKE_PREFIX_PATH="$(python -m ldmrt.cpp prefix)"

The prefix holds include/ldmrt/*.h, lib/libldmrt.a, lib/libldmrt_core.a and lib/cmake/ldmrt/ (the
find_package(ldmrt) config, which finds the same libtorch by itself). Default prefix:
$LDMRT_CPP_PREFIX, else <ldmrt.cache_root()>/cpp/ldmrt-<version>-torch-<version>.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .files import cache_root
from .version import __version__

PACKAGE_DIR = Path(__file__).resolve().parent


def source_dir() -> Path:
    """The CMake project: the repository of an editable install, or the copy a wheel carries."""
    for candidate in (PACKAGE_DIR.parent, PACKAGE_DIR / "_cpp_src"):
        if (candidate / "CMakeLists.txt").is_file() and (candidate / "csrc" / "engine.cpp").is_file():
            return candidate
    raise FileNotFoundError(f"the C++ sources of ldmrt are not beside {PACKAGE_DIR}: reinstall ldmrt")


def default_prefix() -> Path:
    if os.environ.get("LDMRT_CPP_PREFIX"):
        return Path(os.environ["LDMRT_CPP_PREFIX"])
    import torch

    return cache_root() / "cpp" / f"ldmrt-{__version__}-torch-{torch.__version__}"


def config_file(prefix: Path | None = None) -> Path:
    return Path(prefix or default_prefix()) / "lib" / "cmake" / "ldmrt" / "ldmrtConfig.cmake"


def build(prefix: str | Path | None = None, *, jobs: int | None = None, build_type: str = "Release",
          force: bool = False, quiet: bool = False) -> Path:
    """Configure, build and install libldmrt (with the core) into `prefix`; returns the prefix.

    An existing install is reused unless `force`. Raises RuntimeError when cmake or the compiler fail.
    """
    import torch

    prefix = Path(prefix or default_prefix()).resolve()
    if config_file(prefix).is_file() and not force:
        return prefix
    cmake = shutil.which("cmake")
    if cmake is None:
        raise RuntimeError("building libldmrt needs cmake >= 3.18 (apt-get install cmake, or pip install cmake)")
    out = subprocess.DEVNULL if quiet else None
    with tempfile.TemporaryDirectory(prefix="ldmrt-cpp-build-") as build_dir:
        steps = [
            [cmake, "-S", str(source_dir()), "-B", build_dir, f"-DCMAKE_BUILD_TYPE={build_type}",
             "-DLDMRT_BUILD_ENGINE=ON", f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
             f"-DCMAKE_INSTALL_PREFIX={prefix}"],
            [cmake, "--build", build_dir, "-j", str(jobs or os.cpu_count() or 2)],
            [cmake, "--install", build_dir],
        ]
        for step in steps:
            done = subprocess.run(step, stdout=out, stderr=subprocess.PIPE if quiet else None, text=True)
            if done.returncode:
                raise RuntimeError(f"{' '.join(step)} failed ({done.returncode})" +
                                   (f":\n{done.stderr[-4000:]}" if quiet else ""))
    return prefix


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ldmrt.cpp", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build and install libldmrt; prints the prefix")
    b.add_argument("--prefix", help="install prefix (default: %(default)s)", default=None)
    b.add_argument("-j", "--jobs", type=int, default=None)
    b.add_argument("--debug", action="store_true", help="a Debug build")
    b.add_argument("--force", action="store_true", help="rebuild even when the prefix has an install")
    sub.add_parser("prefix", help="print the prefix to pass as CMAKE_PREFIX_PATH")
    args = parser.parse_args(argv)
    if args.command == "build":
        try:
            prefix = build(args.prefix, jobs=args.jobs, build_type="Debug" if args.debug else "Release",
                           force=args.force)
        except (RuntimeError, FileNotFoundError) as e:
            print(f"ldmrt: {e}", file=sys.stderr)
            return 1
        print(prefix)
    else:
        print(default_prefix())
    return 0


if __name__ == "__main__":
    sys.exit(main())
