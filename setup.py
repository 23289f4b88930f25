"""Build the Cython range map; a failed compile fails the install (no silent fallback)."""

from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    ext_modules=cythonize(
        [Extension("qcow2._overlap", ["qcow2/_overlap.pyx"], extra_compile_args=["-O2"])],
        compiler_directives={"language_level": "3", "boundscheck": False,
                             "wraparound": False, "cdivision": True},
    ),
)
