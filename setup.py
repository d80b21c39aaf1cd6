"""Build driver: the Python package plus the C++ extension `ldmrt._C`, compiled by CMakeLists.txt."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("ldmrt needs cmake >= 3.18 to build its C++ core: install it "
                               "(apt-get install cmake, or pip install cmake) and retry")
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = "Debug" if self.debug else "Release"
        subprocess.run([cmake, str(ROOT), f"-DCMAKE_BUILD_TYPE={cfg}",
                        f"-DPython_EXECUTABLE={sys.executable}",
                        f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
                        "-DLDMRT_BUILD_PYTHON=ON",
                        f"-DLDMRT_PYTHON_OUT={out_dir}"], cwd=build_dir, check=True)
        subprocess.run([cmake, "--build", ".", "--config", cfg, "-j", str(os.cpu_count() or 2)],
                       cwd=build_dir, check=True)


class BuildPyWithCppSources(build_py):
    """Also ships the CMake project in the package (ldmrt/_cpp_src), so that an installed ldmrt can build
    libldmrt, its C++ Engine, against the torch installed beside it (`python -m ldmrt.cpp build`)."""

    def run(self):
        super().run()
        dest = Path(self.build_lib) / "ldmrt" / "_cpp_src"
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        for name in ("CMakeLists.txt", "pyproject.toml"):  # CMakeLists.txt reads the version from pyproject.toml
            shutil.copyfile(ROOT / name, dest / name)
        for folder in ("cmake", "csrc"):
            shutil.copytree(ROOT / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__"))


packages = find_packages(include=["ldmrt", "ldmrt.*"]) + ["ldmrt.kernels", "ldmrt.export"]
setup(
    packages=packages,
    package_dir={"ldmrt": "ldmrt", "ldmrt.kernels": "kernels", "ldmrt.export": "export"},
    package_data={"ldmrt": ["presets/*.yaml", "assets/*", "assets/**/*"]},
    ext_modules=[CMakeExtension("ldmrt._C")],
    cmdclass={"build_ext": CMakeBuild, "build_py": BuildPyWithCppSources},
    zip_safe=False,
)
