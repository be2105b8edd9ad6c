#!/usr/bin/env bash
# Builds the safetensors reader with libFuzzer + AddressSanitizer and fuzzes it
# for the given number of seconds (default 60), starting from a seed corpus of
# valid files. Crashing inputs are saved as crash-* in .build/fuzz/.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
out=.build/fuzz
mkdir -p "$out/src" "$out/corpus"
# The reader compiled alone with the core it uses, as one module.
for file in Sources/LoraAggCore/*.swift Sources/LoraAggFormats/JSON.swift Sources/LoraAggFormats/SafeTensors.swift; do
    sed '/^import LoraAggCore$/d' "$file" > "$out/src/$(basename "$file")"
done
swiftc -sanitize=fuzzer,address -parse-as-library -O -module-name LoraAggFuzz \
    -I Sources/COpenBLAS -lopenblas \
    "$out"/src/*.swift Tests/Fuzz/SafeTensorsFuzzEntry.swift -o "$out/fuzz-safetensors"
python3 - "$out/corpus" <<'PY'
import json, struct, sys
def write(name, header, data=b""):
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    open(f"{sys.argv[1]}/{name}", "wb").write(struct.pack("<Q", len(text)) + text + data)
write("two", {"__metadata__": {"format": "pt"},
              "base_model.model.q.lora_A.weight": {"dtype": "F32", "shape": [1, 2], "data_offsets": [0, 8]},
              "base_model.model.q.lora_B.weight": {"dtype": "BF16", "shape": [2, 1], "data_offsets": [8, 12]}},
      struct.pack("<ff", 1.0, 2.0) + b"\x80\x3f\x00\x40")
write("empty", {})
PY
cd "$out" && ./fuzz-safetensors -max_total_time="$seconds" -max_len=4096 corpus
