"""smtpstate/_cdef/*.h declares everything include/smtpstate.h makes public.

API mode already turns a *wrong* declaration into a build or import error;
what it cannot see is a declaration that is *missing* (a new function or
constant in the header that Python never gets). This test compares the
names on both sides. It reads the source tree only.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess

import pytest
from helpers import missing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = os.path.join(ROOT, "include", "smtpstate.h")
CDEF_DIR = os.path.join(ROOT, "smtpstate", "_cdef")

# Header macros that are not constants: X-macro lists and their helpers.
NOT_CONSTANTS = {"SMTPS_BUILTIN_STATES", "SMTPS_STAGES", "SMTPS_X_ENUM", "SMTPS_X_STAGE",
                 "SMTPS_BOUNCE_CLASSES", "SMTPS_X_BOUNCE"}


def _strip_comments(text: str) -> str:
    return re.sub(r"/\*.*?\*/", " ", text, flags=re.S)


def _functions(text: str) -> set:
    text = re.sub(r'extern\s+"Python"[^;]*;', " ", text)
    return set(re.findall(r"\b([A-Za-z_]\w*)\s*\([^()]*\)\s*;", text)) - {"sizeof"}


def _enum_constants(text: str) -> set:
    names = set()
    for body in re.findall(r"\benum\s+\w+\s*\{([^}]*)\}", text):
        for item in body.split(","):
            name = item.split("=")[0].strip()
            if name:
                names.add(name)
    return names


def _defines(text: str) -> set:
    return set(re.findall(r"^\s*#\s*define\s+([A-Z][A-Z0-9_]*)\b(?!\()", text, flags=re.M)) - NOT_CONSTANTS - {"SMTPSTATE_H"}


def _structs(text: str) -> set:
    return set(re.findall(r"\bstruct\s+(\w+)\s*\{", text))


@pytest.fixture(scope="module")
def header():
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        missing("no C compiler to expand the header's X-macros")
    expanded = subprocess.run(
        [cc, "-E", "-P", "-I" + os.path.join(ROOT, "include"), "-"],
        input=b'#include "smtpstate.h"\n',
        stdout=subprocess.PIPE,
        check=True,
    ).stdout.decode()
    with open(HEADER, encoding="utf-8") as f:
        raw = _strip_comments(f.read())
    return expanded, raw


@pytest.fixture(scope="module")
def cdef():
    text = []
    for path in sorted(glob.glob(os.path.join(CDEF_DIR, "*.h"))):
        with open(path, encoding="utf-8") as f:
            text.append(f.read())
    return _strip_comments("\n".join(text))


def test_functions(header, cdef):
    assert _functions(header[0]) == _functions(cdef)


def test_enum_constants(header, cdef):
    assert _enum_constants(header[0]) == _enum_constants(cdef)


def test_defines(header, cdef):
    assert _defines(header[1]) == _defines(cdef)


def test_structs(header, cdef):
    assert _structs(header[0]) == _structs(cdef)


def test_python_trampolines(cdef):
    names = set(re.findall(r'extern\s+"Python"[^;(]*?\b(\w+)\s*\(', cdef))
    assert names == {
        "smtps_py_init_local",
        "smtps_py_setup",
        "smtps_py_callback",
        "smtps_py_free",
        "smtps_py_tostage",
        "smtps_py_tostring",
        "smtps_py_trace",
        "smtps_py_body_read",
    }


def test_build_lists_every_cdef_file():
    # _build.py reads CDEF_FILES in order and refuses unlisted files; import
    # it from the source tree to check that without compiling anything.
    import importlib.util

    spec = importlib.util.spec_from_file_location("_smtpstate_build", os.path.join(ROOT, "smtpstate", "_build.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert sorted(mod.CDEF_FILES) == sorted(os.path.basename(p) for p in glob.glob(os.path.join(CDEF_DIR, "*.h")))
