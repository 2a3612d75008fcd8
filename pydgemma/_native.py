"""Loads the native core (libdgemma) with cffi in ABI mode.

The cffi declarations are not kept by hand: they are cut out of ``dgemma.h`` (between its
``cffi:begin`` and ``cffi:end`` markers), the very header the library was compiled from, which the
build installs next to the library.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

from .errors import NativeLibraryError, PydgemmaError

_PACKAGE_DIR = Path(__file__).resolve().parent
_BEGIN = "/* --- cffi:begin --- */"
_END = "/* --- cffi:end --- */"

if sys.platform == "darwin":
    LIBRARY_NAME = "libdgemma.dylib"
elif sys.platform == "win32":
    LIBRARY_NAME = "dgemma.dll"
else:
    LIBRARY_NAME = "libdgemma.so"


def cdef_from_header(header_text: str) -> str:
    """Returns the C declarations of ``dgemma.h`` in the form cffi's ``cdef`` accepts."""
    try:
        start = header_text.index(_BEGIN) + len(_BEGIN)
        end = header_text.index(_END, start)
    except ValueError as exc:
        raise NativeLibraryError("dgemma.h lacks its cffi:begin/cffi:end markers") from exc
    body = header_text[start:end]
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
    body = re.sub(r"\bDG_API\s+", "", body)
    return body


def abi_version_of_header(header_text: str) -> int:
    """The DG_ABI_VERSION a header declares."""
    m = re.search(r"^#define\s+DG_ABI_VERSION\s+(\d+)\s*$", header_text, flags=re.M)
    if m is None:
        raise NativeLibraryError("dgemma.h does not define DG_ABI_VERSION")
    return int(m.group(1))


def _candidate_dirs() -> Iterator[Path]:
    """Folders that may hold the built library, most specific first."""
    yield _PACKAGE_DIR
    package = sys.modules.get(__package__ or "pydgemma")
    for entry in getattr(package, "__path__", []) or []:
        yield Path(entry)
    # Editable installs keep the compiled files in site-packages while the Python sources stay in
    # the checkout; the distribution's file list knows where the library went.
    try:
        files = importlib.metadata.distribution("pydgemma").files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == LIBRARY_NAME:
            yield Path(str(f.locate())).resolve().parent


def find_library() -> Path:
    """Path of libdgemma: ``$PYDGEMMA_LIBRARY`` if set, else the one installed with this package."""
    override = os.environ.get("PYDGEMMA_LIBRARY")
    if override:
        path = Path(override)
        if not path.is_file():
            raise NativeLibraryError(f"PYDGEMMA_LIBRARY points at '{override}', which is not a file")
        return path
    for folder in _candidate_dirs():
        path = folder / LIBRARY_NAME
        if path.is_file():
            return path
    raise NativeLibraryError(
        f"pydgemma's native library ({LIBRARY_NAME}) was not found next to the package; "
        "reinstall with 'pip install --force-reinstall pydgemma' (or 'pip install -e .' in a checkout)"
    )


def find_header(library: Path) -> Path:
    """The ``dgemma.h`` installed with ``library`` (or the checkout's, for a library built by hand)."""
    for path in (library.parent / "include" / "dgemma.h", _PACKAGE_DIR.parent / "native" / "include" / "dgemma.h"):
        if path.is_file():
            return path
    raise NativeLibraryError(f"dgemma.h not found next to {library}")


class _Native:
    def __init__(self) -> None:
        import cffi

        self.library_path = find_library()
        self.header_path = find_header(self.library_path)
        self.ffi = cffi.FFI()
        header = self.header_path.read_text(encoding="utf-8")
        self.abi_version = abi_version_of_header(header)
        self.ffi.cdef(cdef_from_header(header))
        try:
            self.lib = self.ffi.dlopen(str(self.library_path))
        except OSError as exc:
            raise NativeLibraryError(f"cannot load {self.library_path}: {exc}") from exc
        # The declarations must be the ones the library was built with: calling through another
        # header's layouts would corrupt memory rather than fail.
        try:
            library_abi = int(self.lib.dg_abi_version())
        except AttributeError:  # a library from before the ABI was versioned
            library_abi = None
        if library_abi != self.abi_version:
            found = "no dg_abi_version()" if library_abi is None else f"ABI version {library_abi}"
            raise NativeLibraryError(
                f"{self.library_path} has {found} but {self.header_path} declares DG_ABI_VERSION {self.abi_version}: "
                "the library and its header come from different builds; reinstall pydgemma"
            )

    def string(self, ptr: Any) -> str:
        """A ``const char *`` from the core as text ('' for NULL)."""
        if ptr == self.ffi.NULL:
            return ""
        return self.ffi.string(ptr).decode("utf-8", errors="replace")

    def last_error(self) -> str:
        return self.string(self.lib.dg_last_error())

    def status_name(self, status: int) -> str:
        return self.string(self.lib.dg_status_name(status))

    def check(self, status: int, error: type[Exception] = PydgemmaError, what: str = "") -> None:
        """Raises `error` with the core's one-line message (after `what: `, if given) unless `status`
        is DG_OK: the one place a status becomes an exception (a PydgemmaError also gets its name)."""
        if status != 0:
            message = self.last_error()
            message = f"{what}: {message}" if what else message
            raise error(message, self.status_name(status)) if issubclass(error, PydgemmaError) else error(message)


_native: _Native | None = None
_lock = threading.Lock()


def native() -> _Native:
    """The loaded core (loaded on first use)."""
    global _native
    if _native is None:
        with _lock:
            if _native is None:
                _native = _Native()
    return _native
