"""The CPU kernels are compiled as part of every install, wheel or editable: pyproject.toml holds the metadata,
this file only adds the build step (qwenkit/kernels/build.py, loaded by path: nothing is installed yet)."""

import importlib.util
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

KERNELS = "qwenkit.kernels.lib"


def _kernel_build():
    path = Path(__file__).parent / "qwenkit" / "kernels" / "build.py"
    spec = importlib.util.spec_from_file_location("qwenkit_kernel_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildKernels(build_ext):
    """Builds the kernel variants (shared libraries loaded by ctypes, not Python extension modules) into the
    package's kernels/lib folder, in the build tree or, for an editable install, in the source tree."""

    def run(self):
        for ext in self.extensions:
            self.build_extension(ext)

    def _lib_dir(self) -> Path:
        if self.inplace:
            return Path(__file__).parent / "qwenkit" / "kernels" / "lib"
        return Path(self.build_lib) / "qwenkit" / "kernels" / "lib"

    def build_extension(self, ext):
        build = _kernel_build()
        self._built = build.build_all(self._lib_dir())

    def get_outputs(self):
        lib = self._lib_dir()
        return [str(p) for p in lib.glob("*")] if lib.exists() else []

    def copy_extensions_to_source(self):
        build = _kernel_build()
        build.build_all(Path(__file__).parent / "qwenkit" / "kernels" / "lib")


setup(ext_modules=[Extension(KERNELS, sources=[])], cmdclass={"build_ext": BuildKernels})
