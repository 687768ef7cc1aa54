"""Build the optional C transpose kernel; everything else is in pyproject.toml.

The kernel is optional: where no C compiler is available the build skips it and
`weightbridge.streaming.transform` falls back to numpy's blocked copy (about 2-3x slower to transpose).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "weightbridge._transpose",
            ["weightbridge/_transpose.c"],
            extra_compile_args=["-O3"],
            optional=True,
        )
    ]
)
