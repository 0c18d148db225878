"""setuptools entry point: package metadata and the cffi build.

The native core is built by cffi from ``smtpstate/_build.py`` (out-of-line
API mode); everything about compiling it lives there.
"""

import os
import re

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read(*parts):
    with open(os.path.join(HERE, *parts), encoding="utf-8") as f:
        return f.read()


def version():
    m = re.search(r'^__version__ = "([^"]+)"', read("smtpstate", "__init__.py"), re.M)
    if not m:
        raise RuntimeError("no __version__ in smtpstate/__init__.py")
    return m.group(1)


def long_description():
    for name in ("README.md", "README.rst"):
        if os.path.exists(os.path.join(HERE, name)):
            return read(name)
    return ""


setup(
    name="smtpstate",
    version=version(),
    description=(
        "A fast SMTP client engine in C with a modular state machine, "
        "extensible from Python through cffi"
    ),
    long_description=long_description(),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=["smtpstate"],
    package_data={"smtpstate": ["py.typed"]},
    zip_safe=False,
    python_requires=">=3.9",
    install_requires=["cffi>=1.15"],
    cffi_modules=["smtpstate/_build.py:ffibuilder"],
    extras_require={
        "demo": ["aiosmtpd"],
        "test": ["pytest", "aiosmtpd", "trustme", "hypothesis"],
    },
    entry_points={
        "console_scripts": ["smtpstate=smtpstate.cli:main"],
    },
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Intended Audience :: Developers",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: C",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: Implementation :: CPython",
        "Topic :: Communications :: Email",
        "Topic :: Communications :: Email :: Mail Transport Agents",
    ],
)
