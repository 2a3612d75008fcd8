"""The C ABI and its cffi binding: header and binding cannot drift, the header is plain C, the core
builds warning-free, and a C program can use the library without Python."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pydgemma import _native
from pydgemma.errors import PydgemmaError

REPO = Path(__file__).resolve().parent.parent
HEADER = REPO / "native" / "include" / "dgemma.h"


def declared_functions(cdef: str) -> set[str]:
    return set(re.findall(r"\b(dg_\w+)\s*\(", cdef))


def test_installed_header_is_the_source_header() -> None:
    nat = _native.native()
    assert nat.header_path.read_text() == HEADER.read_text(), (
        f"{nat.header_path} differs from {HEADER}: rebuild with 'pip install -e .'"
    )


def test_every_declared_function_is_exported() -> None:
    nat = _native.native()
    names = declared_functions(_native.cdef_from_header(HEADER.read_text()))
    assert len(names) >= 20
    for name in sorted(names):
        assert callable(getattr(nat.lib, name)), name  # ABI mode: AttributeError if not exported


def test_every_exported_symbol_is_declared() -> None:
    nat = _native.native()
    out = subprocess.run(["nm", "-D", "--defined-only", str(nat.library_path)], capture_output=True, text=True, check=True)
    exported = {line.split()[-1] for line in out.stdout.splitlines() if line.split()[-2:-1] == ["T"]}
    assert exported == declared_functions(HEADER.read_text())


def test_cdef_extraction() -> None:
    cdef = _native.cdef_from_header(HEADER.read_text())
    # the one preprocessor line cffi reads is the ABI version constant
    assert [line for line in cdef.splitlines() if "#" in line] == [f"#define DG_ABI_VERSION {_native.native().abi_version}"]
    assert "DG_API" not in cdef and "/*" not in cdef
    assert "typedef struct dg_model dg_model;" in cdef
    with pytest.raises(_native.NativeLibraryError, match="markers"):
        _native.cdef_from_header("int x;")


def test_abi_version_of_library_and_header() -> None:
    nat = _native.native()
    assert nat.abi_version == _native.abi_version_of_header(HEADER.read_text()) == nat.lib.dg_abi_version() >= 2
    assert nat.lib.DG_ABI_VERSION == nat.abi_version


def test_binding_refuses_a_library_of_another_abi(tmp_path: Path) -> None:
    """A header whose DG_ABI_VERSION differs from the library's: the binding refuses to load."""
    import ggml

    nat = _native.native()
    (tmp_path / "include").mkdir()
    (tmp_path / _native.LIBRARY_NAME).symlink_to(nat.library_path)
    other = re.sub(r"#define DG_ABI_VERSION \d+", "#define DG_ABI_VERSION 999", HEADER.read_text())
    (tmp_path / "include" / "dgemma.h").write_text(other)
    env = {"PYDGEMMA_LIBRARY": str(tmp_path / _native.LIBRARY_NAME),
           "LD_LIBRARY_PATH": str(Path(ggml.__file__).parent / "lib"), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "pydgemma", "--version"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1
    assert "declares DG_ABI_VERSION 999" in r.stderr and f"ABI version {nat.abi_version}" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(("compiler", "flags"), [("cc", ["-x", "c", "-std=c99"]), ("c++", ["-x", "c++", "-std=c++17"])])
def test_header_is_self_contained(tmp_path: Path, compiler: str, flags: list[str]) -> None:
    src = tmp_path / "use_header.txt"
    src.write_text('#include "dgemma.h"\nint main(void) { return dg_model_default_params().use_mmap ? 0 : 1; }\n')
    subprocess.run([compiler, *flags, "-Wall", "-Wextra", "-Wpedantic", "-Werror", "-fsyntax-only", "-I", str(HEADER.parent), str(src)],
                   check=True)


def test_status_names_and_last_error() -> None:
    nat = _native.native()
    assert nat.status_name(0) == "DG_OK"
    assert nat.status_name(3) == "DG_ERR_FORMAT"
    out = nat.ffi.new("dg_model **")
    status = nat.lib.dg_model_load(b"/nonexistent/x.gguf", nat.ffi.NULL, out)
    assert status == nat.lib.DG_ERR_IO and out[0] == nat.ffi.NULL
    assert nat.last_error() == "cannot open '/nonexistent/x.gguf': No such file or directory"
    assert nat.lib.dg_model_load(b"x", nat.ffi.NULL, nat.ffi.NULL) == nat.lib.DG_ERR_INVALID_ARG
    assert nat.last_error() == "dg_model_load: out_model is NULL"
    # NULL handles are refused, not dereferenced
    info = nat.ffi.new("dg_hparams *")
    assert nat.lib.dg_model_hparams(nat.ffi.NULL, info) == nat.lib.DG_ERR_INVALID_ARG
    assert nat.lib.dg_model_n_tensors(nat.ffi.NULL) == 0
    assert nat.lib.dg_device_get(10_000, nat.ffi.new("dg_device_info *")) == nat.lib.DG_ERR_INVALID_ARG


def test_index_bounds(tiny_model_path: Path) -> None:
    nat = _native.native()
    out = nat.ffi.new("dg_model **")
    assert nat.lib.dg_model_load(str(tiny_model_path).encode(), nat.ffi.NULL, out) == 0
    model = nat.ffi.gc(out[0], nat.lib.dg_model_free)
    assert nat.lib.dg_model_tensor(model, 144, nat.ffi.new("dg_tensor_info *")) == nat.lib.DG_ERR_INVALID_ARG
    assert nat.last_error() == "tensor index 144 out of range (144 tensors)"
    assert nat.lib.dg_model_layer(model, 6, nat.ffi.new("dg_layer_info *")) == nat.lib.DG_ERR_INVALID_ARG
    assert nat.lib.dg_model_meta_key(model, 10_000) == nat.ffi.NULL
    assert nat.lib.dg_model_meta_get(model, b"no.such.key") == nat.ffi.NULL
    assert nat.string(nat.lib.dg_model_meta_get(model, b"diffusion.canvas_length")) == "16"


C_PROGRAM = r"""
#include "dgemma.h"
#include <stdio.h>

int main(int argc, char ** argv) {
    dg_model_params params = dg_model_default_params();
    params.device = "cpu";
    dg_model * model = NULL;
    for (int i = 1; i < argc; ++i) {
        dg_status st = dg_model_load(argv[i], &params, &model);
        if (st != DG_OK) {
            printf("%s: %s\n", dg_status_name(st), dg_last_error());
            continue;
        }
        dg_hparams hp;
        dg_model_hparams(model, &hp);
        printf("ok layers=%u embd=%u vocab=%u canvas=%u tensors=%zu device=%s\n", hp.n_layer, hp.n_embd, hp.n_vocab,
               hp.canvas_length, dg_model_n_tensors(model), dg_model_device(model));
        dg_model_free(model);
    }
    return 0;
}
"""


def test_c_program_uses_the_library(tmp_path: Path, tiny_model_path: Path) -> None:
    nat = _native.native()
    src = tmp_path / "client.c"
    src.write_text(C_PROGRAM)
    exe = tmp_path / "client"
    lib_dir = nat.library_path.parent
    subprocess.run(["cc", "-std=c99", "-Wall", "-Wextra", "-Werror", "-I", str(HEADER.parent), str(src), "-o", str(exe),
                    f"-L{lib_dir}", "-ldgemma", f"-Wl,-rpath,{lib_dir}"], check=True)
    out = subprocess.run([str(exe), str(tiny_model_path), "/etc/hostname"], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == [
        "ok layers=6 embd=32 vocab=96 canvas=16 tensors=144 device=CPU",
        "DG_ERR_FORMAT: not a GGUF file: '/etc/hostname' does not start with the GGUF magic",
    ]


@pytest.mark.slow
def test_core_builds_warning_free(tmp_path: Path) -> None:
    """-Wall -Wextra -Wpedantic -Wshadow -Wconversion with -Werror, against the same ggml as the package."""
    cmake = shutil.which("cmake")
    assert cmake, "cmake is needed for this test (pip install cmake)"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    build = tmp_path / "build"
    subprocess.run([cmake, "-S", str(REPO), "-B", str(build), *gen, "-DDGEMMA_WERROR=ON", "-DDGEMMA_GGML=PYTHON",
                    f"-DPython_EXECUTABLE={sys.executable}"], check=True, capture_output=True)
    result = subprocess.run([cmake, "--build", str(build), "--parallel", "2"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "warning" not in (result.stdout + result.stderr).lower()


def test_internal_error_status() -> None:
    """DG_ERR_INTERNAL (a bug, not the input) was appended: the older codes keep their numbers."""
    nat = _native.native()
    codes = {name: getattr(nat.lib, name) for name in ("DG_OK", "DG_ERR_INVALID_ARG", "DG_ERR_IO", "DG_ERR_FORMAT",
                                                       "DG_ERR_UNSUPPORTED", "DG_ERR_OUT_OF_MEMORY", "DG_ERR_BACKEND",
                                                       "DG_ERR_INTERNAL")}
    assert list(codes.values()) == list(range(8))
    for name, code in codes.items():
        assert nat.status_name(code) == name
    assert nat.status_name(99) == "DG_ERR_UNKNOWN"
    with pytest.raises(PydgemmaError) as e:
        nat.check(nat.lib.DG_ERR_INTERNAL)
    assert e.value.status == "DG_ERR_INTERNAL"


def _null_call_args(nat: _native._Native, func: object) -> list[object]:
    """NULL for every pointer parameter, 0 for every number."""
    args: list[object] = []
    for t in nat.ffi.typeof(func).args:
        args.append(nat.ffi.NULL if t.kind == "pointer" else 0)
    return args


def test_every_call_that_can_be_misused_returns_a_status() -> None:
    """Header convention: a function returns a dg_status unless it is a *_free (NULL: no-op), a
    *_default_params, or a pure getter (a number, or a string that is NULL for a NULL handle). Every
    status-returning function, called with NULL pointers and zeros, refuses with DG_ERR_INVALID_ARG
    and says why, and every getter returns 0 or NULL for a NULL handle."""
    nat = _native.native()
    names = sorted(declared_functions(_native.cdef_from_header(HEADER.read_text())))
    describing = {"dg_last_error", "dg_status_name", "dg_version", "dg_ggml_version"}  # never NULL
    status_calls = []
    for name in names:
        func = getattr(nat.lib, name)
        result = nat.ffi.typeof(func).result
        if result.cname == "dg_status":
            status_calls.append(name)
            assert func(*_null_call_args(nat, func)) == nat.lib.DG_ERR_INVALID_ARG, name
            assert nat.last_error(), f"{name} refused without a message"
        elif result.cname == "void":
            assert name.endswith("_free"), f"{name} returns void but is not a *_free"
            func(*_null_call_args(nat, func))  # NULL is a no-op
        elif name.endswith("_default_params"):
            func(*_null_call_args(nat, func))  # a NULL model: the library's defaults
        elif result.cname == "char *" or result.cname == "char const *" or result.kind == "pointer":
            value = func(*_null_call_args(nat, func))
            if name in describing:
                assert value != nat.ffi.NULL, name
            else:
                assert value == nat.ffi.NULL, f"{name}(NULL) should be NULL (absent), not a string"
        else:
            assert result.kind == "primitive", (name, result.cname)
            if name not in {"dg_abi_version", "dg_device_count"}:
                assert func(*_null_call_args(nat, func)) == 0, name
    assert len(status_calls) >= 25


def test_absent_is_null_and_empty_is_empty(make_gguf, monkeypatch: pytest.MonkeyPatch) -> None:
    """Metadata getters: NULL for an absent key or an index out of range, "" for a present, empty
    value; the kernels of a context that uses none are "" (present, empty)."""
    import gguf

    nat = _native.native()
    # gguf-py's add_string skips an empty value: write the key through add_key_value
    monkeypatch.setattr(gguf.GGUFWriter, "add_empty_string",
                        lambda self, key, val: self.add_key_value(key, val, gguf.GGUFValueType.STRING), raising=False)
    path = make_gguf(set_keys={"general.name": ("empty_string", ""), "test.empty": ("empty_string", "")})
    out = nat.ffi.new("dg_model **")
    assert nat.lib.dg_model_load(str(path).encode(), nat.ffi.NULL, out) == 0
    model = nat.ffi.gc(out[0], nat.lib.dg_model_free)
    for key in (b"general.name", b"test.empty"):
        value = nat.lib.dg_model_meta_get(model, key)
        assert value != nat.ffi.NULL and nat.ffi.string(value) == b""
    assert nat.lib.dg_model_meta_get(model, b"no.such.key") == nat.ffi.NULL
    assert nat.lib.dg_model_meta_get(model, nat.ffi.NULL) == nat.ffi.NULL
    n = nat.lib.dg_model_n_meta(model)
    keys = [nat.ffi.string(nat.lib.dg_model_meta_key(model, i)) for i in range(n)]
    assert nat.ffi.string(nat.lib.dg_model_meta_value(model, keys.index(b"test.empty"))) == b""
    assert nat.lib.dg_model_meta_key(model, n) == nat.ffi.NULL
    assert nat.lib.dg_model_meta_value(model, n) == nat.ffi.NULL
    assert nat.ffi.string(nat.lib.dg_model_device(model)) == b"CPU"

    params = nat.ffi.new("dg_context_params *", nat.lib.dg_context_default_params())
    params.n_ctx = 64
    params.cpu_kernels = 0
    ctx_out = nat.ffi.new("dg_context **")
    assert nat.lib.dg_context_new(model, params, ctx_out) == 0
    ctx = nat.ffi.gc(ctx_out[0], nat.lib.dg_context_free)
    kernels = nat.lib.dg_context_kernels(ctx)
    assert kernels != nat.ffi.NULL and nat.ffi.string(kernels) == b""
    assert nat.lib.dg_context_reset(ctx) == 0
    assert nat.lib.dg_context_imatrix_stop(ctx) == 0 and nat.lib.dg_context_imatrix_clear(ctx) == 0
    del ctx
    # the library's own descriptions are never NULL, even with nothing to say
    assert nat.lib.dg_last_error() != nat.ffi.NULL
    assert nat.ffi.string(nat.lib.dg_version()) and nat.ffi.string(nat.lib.dg_ggml_version())
