#!/usr/bin/env bash
# A CI lane on ggml's AVX2 CPU kernels, for machines whose CPU has AVX-512 (where a native ggml
# build takes the AVX-512 paths, and an AVX2-only CPU such as AMD Zen 3 takes others, which differ
# numerically: e.g. ggml's repacked Q4_K kernels).
#   1. skips (exit 0) on a CPU that cannot run an AVX2 build (no AVX, AVX2, FMA, F16C or BMI2);
#   2. builds ggml-python with its CPU backend compiled for x86-64 AVX2 only (GGML_NATIVE=OFF,
#      every AVX-512/AVX-VNNI/AMX option OFF) into a wheel kept outside the clone, in
#      ${PYDGEMMA_CI_CACHE:-/var/cache/pydgemma-ci}/ggml-python-<version>-avx2/, reused while its
#      COMPLETE marker (written last) matches this recipe (the build is not native, so any x86-64
#      CPU with AVX2 can reuse it), and checks that the library reports AVX2 and no AVX-512;
#   3. makes the venv .venv-avx2 with that wheel and pydgemma built against it (no build
#      isolation, so CMake sees the AVX2 ggml-python, not one built natively from PyPI's sdist),
#      and checks again there that ggml and pydgemma.devices() report AVX2 and no AVX-512;
#   4. runs the tests with DGEMMA_NO_CPU_KERNELS=q8_0_matmul,self_cond_mix, the kernels our own
#      policy turns off on a CPU without AVX-512, and PYTHONSAFEPATH=1 (override the command with
#      AVX2_LANE_TESTS).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
lane=avx2_lane
flavour=avx2
. "$repo/.ci/ggml_lane.sh"
recipe=1                 # bump when the build below changes, to invalidate cached wheels

# --- 1. can this CPU run an AVX2 build? ---------------------------------------------------------
section "CPU features"
# What the build below compiles ggml's CPU backend with (-mavx -mavx2 -mfma -mf16c -mbmi2).
cpu_flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
lacking=()
for f in avx avx2 fma f16c bmi2; do
    [[ "$cpu_flags" == *" $f "* ]] || lacking+=("$f")
done
if [ ${#lacking[@]} -gt 0 ]; then
    echo "avx2_lane: SKIPPED: this CPU lacks ${lacking[*]}, so it cannot run an AVX2 build of ggml"
    exit 0
fi
has_avx512=no
[[ "$cpu_flags" == *" avx512f "* ]] && has_avx512=yes
echo "avx avx2 fma f16c bmi2: present (avx512f: $has_avx512)"

if ! command -v c++ >/dev/null; then
    section "apt packages"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends g++ >/dev/null
fi

# --- 2. the AVX2 ggml-python wheel (cached) -----------------------------------------------------
# ggml 0.15.3's x86 options (vendor/ggml/CMakeLists.txt, src/ggml-cpu/CMakeLists.txt). Each is
# given explicitly: their defaults follow GGML_NATIVE and SOURCE_DATE_EPOCH. These are the
# features -march=native enables on Zen 3, the AVX2-only CPU this lane stands for.
avx2_cmake="-DGGML_NATIVE=OFF -DGGML_CPU_ALL_VARIANTS=OFF -DGGML_BACKEND_DL=OFF
 -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
 -DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF
 -DGGML_AVX512_BF16=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"

# Exits unless the ggml CPU library in folder $1 reports AVX2, FMA and F16C and no AVX-512 (ggml
# answers from the macros its CPU backend was compiled with, not from the CPU it runs on).
check_cpu_lib() {
    python3 - "$1" <<'PY'
import ctypes, sys
lib = ctypes.CDLL(f"{sys.argv[1]}/libggml-cpu.so")
has = {n: bool(getattr(lib, f"ggml_cpu_has_{n}")()) for n in
       ("avx", "avx2", "fma", "f16c", "avx_vnni", "avx512", "avx512_vbmi", "avx512_vnni", "avx512_bf16")}
print("   ggml CPU backend:", " ".join(n for n, v in has.items() if v))
bad = [n for n in ("avx", "avx2", "fma", "f16c") if not has[n]] + \
      [n for n in ("avx_vnni", "avx512", "avx512_vbmi", "avx512_vnni", "avx512_bf16") if has[n]]
if bad:
    sys.exit(f"avx2_lane: the ggml CPU backend is not an AVX2-only build (wrong: {', '.join(bad)})")
PY
}

section "AVX2 ggml-python $ggml_py_version wheel ($wheel_dir)"
# What a cached wheel must match: this recipe only (the build is not native: no CPU in the key).
lane_wheel "$wheel_dir" "recipe=$recipe ggml-python=$ggml_py_version arch=x86-64-avx2" "$(echo $avx2_cmake)" check_cpu_lib 4

# --- 3. the venv: AVX2 ggml-python, and pydgemma built against it -------------------------------
section "venv $venv: the AVX2 ggml-python, then pydgemma[test] built against it"
lane_venv "$venv" "$repo"

section "ggml CPU features in the venv"
check_cpu_lib "$(python -c 'import ggml, os; print(os.path.join(os.path.dirname(ggml.__file__), "lib"))')"
# -P: import the installed pydgemma, not the source folder (which holds no libdgemma.so).
python -P - <<'PY'
import sys
import ggml
import pydgemma
if not ggml.ggml_cpu_has_avx2() or ggml.ggml_cpu_has_avx512():
    sys.exit("avx2_lane: the venv's ggml-python is not the AVX2 build")
devs = pydgemma.devices()
for d in devs:
    print(f"   {d.name:10s} {d.type:5s} {' '.join(d.features)}")
cpu = next((d for d in devs if d.name.upper().startswith("CPU")), None)
if cpu is None:
    sys.exit("avx2_lane: pydgemma lists no CPU device")
if "AVX2" not in cpu.features or any(f.startswith("AVX512") for f in cpu.features):
    sys.exit(f"avx2_lane: pydgemma's CPU device is not the AVX2 build (features: {' '.join(cpu.features)})")
PY

# --- 4. the tests, on ggml's AVX2 kernels -------------------------------------------------------
# Our own AVX-512 kernels would run here (they check the CPU, not ggml's build): turn them off, as
# the kernel policy does on an AVX2-only CPU.
export DGEMMA_NO_CPU_KERNELS=q8_0_matmul,self_cond_mix
echo "DGEMMA_NO_CPU_KERNELS=$DGEMMA_NO_CPU_KERNELS"
lane_tests "${AVX2_LANE_TESTS:-python -P -m pytest -q tests/test_repack.py tests/test_forward_parity.py tests/test_cpu_kernels.py tests/test_backend_parity.py tests/test_generate.py tests/test_sampler.py tests/test_demo_model.py tests/test_quantize.py}"
