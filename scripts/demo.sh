#!/usr/bin/env bash
# The main job on this machine, with the built-in echo engine in place of a GPU:
# a dispatcher server over the bundled sample data and one worker running the
# compare_responses example task against it. Prints the output file.
#
#   scripts/demo.sh [INPUT] [OUTPUT]
set -euo pipefail
cd "$(dirname "$0")/.."
input=${1:-examples/data/chat.jsonl}
output=${2:-target/demo/out.jsonl}
mkdir -p "$(dirname "$output")"
rm -f "$output" "$output.checkpoint"

cargo build --release -q -p dispatcher-cli -p dispatcher --bin dispatcher --example compare_responses
port_file=$(mktemp)
target/release/dispatcher serve --infile "$input" --outfile "$output" \
  --host 127.0.0.1 --port 0 --exit-grace 2 >"$port_file" &
server=$!
trap 'kill $server 2>/dev/null || true; rm -f "$port_file"' EXIT
until grep -q "listening on" "$port_file"; do sleep 0.1; done
addr=$(sed -n 's/^listening on //p' "$port_file")
echo "dispatcher serving $input on $addr"

target/release/examples/compare_responses --dispatcher "$addr" --engine echo --workers 32
wait $server
echo "--- $output ($(wc -l <"$output") lines)"
cat "$output"
