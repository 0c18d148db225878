"""setuptools entry point: package metadata and the cffi build.

The native core is built by cffi from ``smtpstate/_build.py`` (out-of-line
API mode); everything about compiling it lives there.
"""

import os
import re
import shutil

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


class BuildExtAlsoInPlace(build_ext):
    """Also put the compiled core next to the sources it was built from.

    ``pip install .`` runs in the checkout, and ``python -m smtpstate``
    puts the current directory first on sys.path: run there, it would
    import the source tree's smtpstate/, which has no _core, instead of
    the installed package. With a copy of the same build in the source
    tree (ignored by git, like ``python smtpstate/_build.py``'s), the
    README's ``pip install '.[demo]' && python -m smtpstate demo`` works
    from the checkout too. A source tree that cannot be written is left
    alone.
    """

    def run(self):
        super().run()
        if self.inplace:
            return
        for ext in self.extensions:
            built = self.get_ext_fullpath(ext.name)
            self.inplace = True
            try:
                target = self.get_ext_fullpath(ext.name)
            finally:
                self.inplace = False
            if os.path.abspath(target).startswith(HERE + os.sep) and os.path.exists(built):
                try:
                    shutil.copyfile(built, target)
                except OSError:
                    pass


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
    cmdclass={"build_ext": BuildExtAlsoInPlace},
    extras_require={
        "demo": ["aiosmtpd"],
        # smtpstate.queue and "smtpstate worker": kombu (py-amqp comes
        # with it), the redis client, msgpack for enqueue(encoding=).
        "queue": ["kombu>=5.3", "redis>=4.5", "msgpack>=1.0"],
        # smtpstate.celery: the delivery task for a Celery app.
        "celery": ["celery>=5.3"],
        "test": ["pytest", "aiosmtpd", "trustme", "hypothesis", "kombu>=5.3", "redis>=4.5",
                 "msgpack>=1.0", "celery>=5.3"],
        # benchmarks/run.py's peers and its STARTTLS sink (Postfix's
        # smtp-sink and smtp-source come from apt-get install postfix).
        "bench": ["aiosmtplib", "aiosmtpd", "trustme"],
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
