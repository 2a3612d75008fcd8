# Shared by the CI lanes that run pydgemma on a ggml-python built their own way (avx2_lane.sh,
# vulkan_lane.sh): the wheel cache outside the clone, the lane's venv, and the test run.
# Source it after setting `lane` (the name in messages), `flavour` (avx2, vulkan) and `repo`; it sets
# ggml_py_version, wheel_dir (the cache of that flavour's wheel) and venv.
ggml_py_version=0.0.45
wheel_dir="${PYDGEMMA_CI_CACHE:-/var/cache/pydgemma-ci}/ggml-python-$ggml_py_version-$flavour"
venv="$repo/.venv-$flavour"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_PROGRESS_BAR=off DEBIAN_FRONTEND=noninteractive
lane_start=$SECONDS
section() { echo "== $* [$((SECONDS - lane_start)) s]"; }
die() { echo "$lane: $*" >&2; exit 1; }

# lane_wheel DIR KEY CMAKE_ARGS CHECK MINUTES: sets `wheel` to a ggml-python wheel built with
# CMAKE_ARGS, kept in DIR and reused while DIR/COMPLETE (written last) holds KEY. CHECK is a command
# run with the folder the new wheel is unzipped to; it must succeed for the wheel to be kept.
# CFLAGS/CXXFLAGS are unset for the build (a -march=native there would come first on ggml's
# command lines); --no-cache-dir, because pip's wheel cache would otherwise hand back a
# ggml-python built earlier from the same sdist another way.
lane_wheel() {
    local dir=$1 key=$2 cmake_args=$3 check=$4 minutes=$5
    if [ -f "$dir/COMPLETE" ] && [ "$(cat "$dir/COMPLETE")" = "$key" ] \
        && compgen -G "$dir/ggml_python-$ggml_py_version-*.whl" >/dev/null; then
        wheel=$(compgen -G "$dir/ggml_python-$ggml_py_version-*.whl" | head -n1)
        echo "cached: $(basename "$wheel") ($key)"
        return 0
    fi
    echo "building (about $minutes minutes on 2 cores)"
    local tmp staging whl
    tmp=$(mktemp -d)
    python3 -m venv "$tmp/build-venv"
    "$tmp/build-venv/bin/python" -m pip install -q cmake ninja
    mkdir -p "$(dirname "$dir")"
    staging=$(mktemp -d "$(dirname "$dir")/.building-XXXXXX")
    env -u CFLAGS -u CXXFLAGS CMAKE_ARGS="$cmake_args" \
    CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) PATH="$tmp/build-venv/bin:$PATH" \
        "$tmp/build-venv/bin/python" -m pip wheel -q --no-cache-dir --no-deps --no-binary ggml-python \
            -w "$staging" "ggml-python==$ggml_py_version" > "$tmp/wheel-build.log" 2>&1 \
        || { tail -n 60 "$tmp/wheel-build.log" >&2; rm -rf "$staging" "$tmp"; die "the ggml-python build failed"; }
    whl=$(compgen -G "$staging/ggml_python-$ggml_py_version-*.whl" | head -n1) || true
    [ -n "$whl" ] || { rm -rf "$staging" "$tmp"; die "pip wheel made no ggml_python wheel"; }
    python3 -m zipfile -e "$whl" "$tmp/unzipped"
    $check "$tmp/unzipped/ggml/lib" || { rm -rf "$staging" "$tmp"; exit 1; }
    echo "$key" > "$staging/COMPLETE"
    rm -rf "$dir" "$tmp"
    mv "$staging" "$dir"
    chmod 755 "$dir"
    wheel=$(compgen -G "$dir/ggml_python-$ggml_py_version-*.whl" | head -n1)
    echo "built: $(basename "$wheel")"
}

# lane_venv VENV REPO: a fresh venv with $wheel, then pydgemma[test] built against it (no build
# isolation, so CMake sees this ggml-python, not one from PyPI), activated.
lane_venv() {
    python3 -m venv --clear "$1"
    . "$1/bin/activate"
    # --no-compile: byte-compiling torch & co. would take most of this step (Python compiles on import).
    python -m pip install -q --no-compile "$wheel" scikit-build-core cmake ninja
    python -m pip install -q --no-compile --no-build-isolation "$2[test]"
}

# lane_tests COMMAND: runs it and exits with its status. PYTHONSAFEPATH=1 for the Pythons the
# tests start too (python -c, -m pydgemma.quantize): from the repo root they would otherwise
# import the source folder's pydgemma, which has no libdgemma.so.
lane_tests() {
    export PYTHONSAFEPATH=1
    section "tests: $1"
    set +e
    bash -c "$1"
    local rc=$?
    set -e
    section "done (exit $rc)"
    exit $rc
}
