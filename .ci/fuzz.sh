#!/usr/bin/env bash
# Builds the GGUF loader fuzzer (libFuzzer + ASan + UBSan), seeds it with small valid files made by
# our own writer, replays the saved regression inputs, then fuzzes for FUZZ_SECONDS (default 60).
#   FUZZ_SECONDS=600 bash .ci/fuzz.sh        # a longer local session
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
build=${FUZZ_BUILD:-$repo/build/fuzz}
seconds=${FUZZ_SECONDS:-60}
if ! command -v clang++ >/dev/null; then
    apt-get update -qq && apt-get install -y -qq clang libclang-rt-14-dev
fi
CXX=clang++ CC=clang cmake -S "$repo/native/fuzz" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DPython_EXECUTABLE="$(command -v python)" >/dev/null
cmake --build "$build" >/dev/null
seeds="$build/seeds"
mkdir -p "$seeds"
rm -f "$build"/crash-* "$build"/leak-* "$build"/timeout-* "$build"/oom-*
python - "$repo/tests" "$seeds" <<'PY'
import sys
sys.path.insert(0, sys.argv[1])
import tiny_gguf
small = tiny_gguf.tiny(n_vocab=16, n_embd=8, n_layer=2, n_head=2, n_head_kv_swa=1, n_head_kv_full=1, head_dim_swa=4,
                       head_dim=8, n_ff=8, n_ff_exp=4, n_expert=2, n_expert_used=1, sliding_window=4, canvas_length=4,
                       sliding_pattern=(True, False))
tiny_gguf.write_gguf(f"{sys.argv[2]}/small.gguf", small)
tiny_gguf.write_gguf(f"{sys.argv[2]}/small-split.gguf", small, split_experts=True, self_cond=False)
PY
export ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
corpus="$repo/native/fuzz/corpus"
echo "replaying $(ls "$corpus" | wc -l) saved inputs"
"$build/fuzz_gguf_loader" -runs=0 "$corpus" 2>&1 | tail -1
work="$build/corpus"
mkdir -p "$work"
"$build/fuzz_gguf_loader" -max_total_time="$seconds" -max_len=65536 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="$build/" "$work" "$seeds" "$corpus" 2>&1 | grep -E "^(stat::number_of_executed_units|stat::peak_rss|Done|INFO: seed)|ERROR|SUMMARY" || true
found=$(find "$build" -maxdepth 1 \( -name 'crash-*' -o -name 'leak-*' -o -name 'timeout-*' -o -name 'oom-*' \) -print)
if [ -n "$found" ]; then
    echo "the fuzzer found failing inputs (add each to native/fuzz/corpus/ with its fix):" >&2
    echo "$found" >&2
    exit 1
fi
echo "python readers: replaying saved inputs, then $((seconds / 2)) s of atheris"
python -m pip install -q atheris
python "$repo/tests/fuzz/fuzz_safetensors.py" -runs=0 "$repo/tests/fuzz/safetensors_findings" 2>&1 | tail -1
st_work="$build/st_corpus"
mkdir -p "$st_work"
(cd "$build" && python "$repo/tests/fuzz/fuzz_safetensors.py" -max_total_time=$((seconds / 2)) -rss_limit_mb=1024 \
    "$st_work" "$repo/tests/fuzz/safetensors_seeds" "$repo/tests/fuzz/safetensors_findings" 2>&1 | grep -E "^Done|Error" || true)
gg_work="$build/gguf_corpus"
mkdir -p "$gg_work"
(cd "$build" && python "$repo/tests/fuzz/fuzz_gguf_reader.py" -max_total_time=$((seconds / 2)) -rss_limit_mb=2048 \
    "$gg_work" "$seeds" "$repo/tests/fuzz/gguf_findings" 2>&1 | grep -E "^Done|Error" || true)
found=$(find "$build" -maxdepth 1 \( -name 'crash-*' -o -name 'oom-*' -o -name 'timeout-*' \) -print)
if [ -n "$found" ]; then
    echo "the Python fuzzers found failing inputs (add each to tests/fuzz/*_findings/ with its fix):" >&2
    echo "$found" >&2
    exit 1
fi
echo "fuzz: ok"
