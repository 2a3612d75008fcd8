#!/usr/bin/env bash
# The quantization drift gate: the demo model's F32 weights (.ci/drift/sudoku4-f32.gguf, the file the
# demo recipe writes; its Q8_0 is the shipped model byte for byte) quantized to Q8_0, Q4_K_M and
# NVFP4 with the current quantizer, each measured against the F32 by `pydgemma-quantize drift` and
# held to the thresholds in .ci/drift_baseline.json. The reference runs once (--save-ref); the
# other two replay it (--ref-cache). Every type is measured and shown before the verdict.
# DRIFT_OUT=DIR keeps the quantized files, JSON reports and Markdown summaries there.
set -euo pipefail
cd "$(dirname "$0")/.."

ref=.ci/drift/sudoku4-f32.gguf
baseline=.ci/drift_baseline.json
out="${DRIFT_OUT:-$(mktemp -d)}"
mkdir -p "$out"
[ -n "${DRIFT_OUT:-}" ] || trap 'rm -rf "$out"' EXIT

status=0
source=(--ref "$ref" --save-ref "$out/ref.npz")
for type in Q8_0 Q4_K_M NVFP4; do
    rm -f "$out/$type.json" "$out/$type.md"
    pydgemma-quantize quantize "$ref" -o "$out/$type.gguf" -t "$type" --force --quiet
    pydgemma-quantize drift "${source[@]}" -m "$out/$type.gguf" --canvases 64 --quiet \
        -o "$out/$type.json" --markdown "$out/$type.md" --baseline "$baseline" --baseline-key "$type" || status=1
    if [ -f "$out/$type.md" ]; then cat "$out/$type.md"; fi
    source=(--ref-cache "$out/ref.npz")
done
exit $status
