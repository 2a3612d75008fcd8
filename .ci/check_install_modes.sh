#!/usr/bin/env bash
# Checks the two installs that the test run (an editable install against ggml-python) does not:
#   (a) a regular `pip install .` into a fresh environment, with ggml-python from PyPI;
#   (c) `pip install .` against a ggml built and installed separately, found via CMAKE_PREFIX_PATH
#       and via GGML_DIR; the core must then run on that ggml, not on ggml-python's copy.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
unset CMAKE_ARGS

python3 -m venv "$work/venv"
. "$work/venv/bin/activate"
site=$(python -c "import sysconfig; print(sysconfig.get_paths()['platlib'])")

echo "-- (a) pip install . with ggml-python"
pip install -q "$repo" gguf==0.19.0
readelf -d "$site/pydgemma/libdgemma.so" | grep -q 'NEEDED.*\[libggml.so\]'
readelf -d "$site/pydgemma/libdgemma.so" | grep -q 'RUNPATH.*\$ORIGIN/../ggml/lib'
cd "$work"
python -c "import sys; sys.path.insert(0, '$repo/tests'); import tiny_gguf; tiny_gguf.write_gguf('tiny.gguf')"
pydgemma info -m tiny.gguf --json | python -c "import json, sys; assert json.load(sys.stdin)['tensor_count'] == 144"
if pydgemma info -m /etc/hostname 2>err.txt; then echo "expected a failure" >&2; exit 1; fi
[ "$(wc -l < err.txt)" -eq 1 ] && grep -q '^error: not a GGUF file' err.txt
pydgemma-quantize convert --help >/dev/null
# the bundled demo model ships in the wheel and solves its sample puzzle
pydgemma run --json --seed 1 | python -c "import json, sys; assert json.load(sys.stdin)['solved'] is True"
python -c "import pydgemma.quantize, pydgemma.models"
# the server's page ships; without the serve extra, `pydgemma serve` says what to install, on one line
python -c "import importlib.resources as r; assert (r.files('pydgemma') / 'server' / 'static' / 'index.html').is_file()"
if pydgemma serve --port 0 2>err.txt; then echo "expected serve to refuse without FastAPI" >&2; exit 1; fi
[ "$(wc -l < err.txt)" -eq 1 ] && grep -q "pip install 'pydgemma\[serve\]'" err.txt
# quantize/ and models/ ship inside pydgemma, never as generic top-level modules
for generic in quantize models; do
    if python -c "import $generic" 2>/dev/null; then echo "a top-level '$generic' module was installed" >&2; exit 1; fi
done

echo "-- (c) a user's own ggml"
pip download -q --no-deps --no-binary :all: -d "$work/sdist" ggml-python==0.0.45
tar xzf "$work"/sdist/ggml_python-0.0.45.tar.gz -C "$work"
python -m pip install -q cmake ninja
cmake -S "$work/ggml_python-0.0.45/vendor/ggml" -B "$work/ggml-build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DGGML_BUILD_TESTS=OFF -DGGML_BUILD_EXAMPLES=OFF -DCMAKE_INSTALL_PREFIX="$work/ggml" >/dev/null
cmake --build "$work/ggml-build" --parallel 2 >/dev/null
cmake --install "$work/ggml-build" >/dev/null

check_own_ggml() {
    readelf -d "$site/pydgemma/libdgemma.so" | grep -q 'NEEDED.*\[libggml.so.0\]'
    readelf -d "$site/pydgemma/libdgemma.so" | grep -q "PATH.*$work/ggml/lib"
    python - "$work/ggml/lib" <<'PY'
import sys
import pydgemma
m = pydgemma.Model("tiny.gguf")
assert m.hparams["n_layer"] == 6, m.hparams
maps = [line.split()[-1] for line in open("/proc/self/maps") if "libggml" in line]
assert maps and all(p.startswith(sys.argv[1]) for p in maps), maps
print("   loaded ggml from", sorted(set(maps))[0].rsplit("/", 1)[0])
PY
}
CMAKE_PREFIX_PATH="$work/ggml" pip install -q --force-reinstall --no-deps "$repo"
check_own_ggml
GGML_DIR="$work/ggml/lib/cmake/ggml" pip install -q --force-reinstall --no-deps "$repo"
check_own_ggml
echo "install modes: ok"
