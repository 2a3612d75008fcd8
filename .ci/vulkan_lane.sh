#!/usr/bin/env bash
# A CI lane on a real non-CPU ggml backend: Vulkan on Mesa's lavapipe (a software Vulkan device).
#   1. installs the Debian packages it needs (the Vulkan loader and headers, lavapipe, glslc);
#   2. builds ggml-python with GGML_VULKAN=ON into a wheel kept outside the clone, in
#      ${PYDGEMMA_CI_CACHE:-/var/cache/pydgemma-ci}/ggml-python-<version>-vulkan/, reused while its
#      COMPLETE marker (written last) matches this recipe and this CPU (the build is -march=native);
#   3. makes the venv .venv-vulkan with that wheel and pydgemma built against it (no build
#      isolation, so CMake sees the Vulkan ggml-python, not PyPI's CPU one), and checks that
#      pydgemma lists the device Vulkan0;
#   4. runs tests/test_backend_parity.py on Vulkan0 against the CPU: denoising logits, the step's
#      reductions, chi-square of the draws, step vs denoise + host sampler, whole generations
#      (override the command with VULKAN_LANE_TESTS).
# ggml lists lavapipe (a CPU-type Vulkan device) only when GGML_VK_VISIBLE_DEVICES names it.
# ggml 0.15.3's Vulkan backend needs Vulkan headers newer than Debian 12's 1.3.239 (it uses
# vk::LayerSettingEXT); on such a system the headers of Debian 13 (trixie) are fetched from the
# machine's own Debian mirror with a throw-away apt configuration and unpacked into a temp folder:
# the system's apt sources and packages are not changed.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
lane=vulkan_lane
flavour=vulkan
. "$repo/.ci/ggml_lane.sh"
header_suite=trixie      # the Debian release whose Vulkan headers ggml 0.15.3 builds with
recipe=3                 # bump when the build below changes, to invalidate cached wheels

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# --- 1. Debian packages -------------------------------------------------------------------------
section "apt packages"
pkgs=(libvulkan1 libvulkan-dev mesa-vulkan-drivers glslc spirv-headers)
command -v c++ >/dev/null || pkgs+=(g++)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
apt_updated=0
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    apt-get update -qq
    apt_updated=1
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    echo "all present: ${pkgs[*]}"
fi
ls /usr/share/vulkan/icd.d/lvp_icd.*.json >/dev/null 2>&1 || die "no lavapipe ICD in /usr/share/vulkan/icd.d"

# --- 2. the Vulkan ggml-python wheel (cached) ---------------------------------------------------
# Prints the include/ and SPIRV-Headers cmake folders to build with ("" when the system's do).
newer_vulkan_headers() {
    if grep -rqs 'struct LayerSettingEXT' /usr/include/vulkan/; then
        return 0
    fi
    local codename mirror apt_dir
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    # The Debian archive this machine already uses (not its security or updates suites).
    mirror=$(apt-get indextargets --format '$(REPO_URI)' "Label: Debian" "Codename: $codename" 2>/dev/null | head -n1)
    if [ -z "$mirror" ] && [ "$apt_updated" = 0 ]; then
        apt-get update -qq
        mirror=$(apt-get indextargets --format '$(REPO_URI)' "Label: Debian" "Codename: $codename" 2>/dev/null | head -n1)
    fi
    [ -n "$mirror" ] || die "cannot tell which Debian mirror this machine uses (apt-get indextargets)"
    echo "system Vulkan headers predate vk::LayerSettingEXT: fetching $header_suite's from $mirror" >&2
    apt_dir="$work/apt"
    mkdir -p "$apt_dir/state/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/parts" "$apt_dir/prefs" "$apt_dir/debs" "$work/headers"
    : > "$apt_dir/status"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $header_suite main" > "$apt_dir/sources.list"
    local opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o "Dir::Etc::SourceParts=$apt_dir/parts"
                -o "Dir::Etc::Preferences=$apt_dir/prefs/none" -o "Dir::Etc::PreferencesParts=$apt_dir/prefs"
                -o "Dir::State=$apt_dir/state" -o "Dir::State::status=$apt_dir/status"
                -o "Dir::Cache=$apt_dir/cache" -o "APT::Sandbox::User=root" -o "Acquire::Languages=none")
    apt-get "${opts[@]}" update -qq >&2
    (cd "$apt_dir/debs" && apt-get "${opts[@]}" download -qq libvulkan-dev spirv-headers >&2)
    for deb in "$apt_dir"/debs/*.deb; do
        dpkg -x "$deb" "$work/headers"
    done
    local inc="$work/headers/usr/include" spirv="$work/headers/usr/share/cmake/SPIRV-Headers"
    grep -rqs 'struct LayerSettingEXT' "$inc/vulkan/" || die "$header_suite's Vulkan headers lack LayerSettingEXT"
    [ -f "$spirv/SPIRV-HeadersConfig.cmake" ] || die "no SPIRV-HeadersConfig.cmake in $spirv"
    echo "-DVulkan_INCLUDE_DIR=$inc -DSPIRV-Headers_DIR=$spirv"
}

section "Vulkan ggml-python $ggml_py_version wheel ($wheel_dir)"
# What a cached wheel must match: this recipe, and the CPU (ggml's CPU backend is built native).
cache_key="recipe=$recipe ggml-python=$ggml_py_version cpu=$(grep -m1 '^flags' /proc/cpuinfo | sha256sum | cut -c1-16)"
has_vulkan_lib() {
    [ -f "$1/libggml-vulkan.so" ] || { echo "vulkan_lane: no libggml-vulkan.so in the wheel: GGML_VULKAN was not applied" >&2; return 1; }
}
extra_cmake=""
if ! { [ -f "$wheel_dir/COMPLETE" ] && [ "$(cat "$wheel_dir/COMPLETE")" = "$cache_key" ]; }; then
    extra_cmake=$(newer_vulkan_headers)
fi
# The Vulkan library itself comes from the system packages.
lane_wheel "$wheel_dir" "$cache_key" \
    "-DGGML_VULKAN=ON -DGGML_NATIVE=ON -DVulkan_LIBRARY=$(ls /usr/lib/*/libvulkan.so.1 | head -n1) $extra_cmake" has_vulkan_lib 6

# --- 3. the venv: Vulkan ggml-python, and pydgemma built against it -----------------------------
section "venv $venv: the Vulkan ggml-python, then pydgemma[test] built against it"
lane_venv "$venv" "$repo"
python -c "import ggml, sys; sys.exit(0 if any(p.name == 'libggml-vulkan.so' for p in __import__('pathlib').Path(ggml.__file__).parent.joinpath('lib').iterdir()) else 'the venv has a ggml-python without Vulkan')"

export GGML_VK_VISIBLE_DEVICES=0 PYDGEMMA_TEST_DEVICE=Vulkan0
section "devices (GGML_VK_VISIBLE_DEVICES=0)"
# -P: import the installed pydgemma, not the source folder (which holds no libdgemma.so).
python -P - <<'PY'
import sys
import pydgemma
devs = pydgemma.devices()
for d in devs:
    print(f"   {d.name:10s} {d.type:5s} {d.description}")
if "Vulkan0" not in [d.name for d in devs]:
    sys.exit("vulkan_lane: pydgemma lists no Vulkan0 device (lavapipe): the lane would test nothing")
PY

# --- 4. the tests, on Vulkan0 -------------------------------------------------------------------
lane_tests "${VULKAN_LANE_TESTS:-python -P -m pytest -q tests/test_backend_parity.py}"
