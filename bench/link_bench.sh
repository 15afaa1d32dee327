#!/usr/bin/env bash
# Loopback throughput of one peer link, large frames, over the gRPC and the UCX data planes, with
# iperf3 over the same loopback as the ceiling; one table. Both link ends run in one process
# (bench/link_bench.cc), so its CPU column is both ends together.
#
#   bash bench/link_bench.sh [BUILD_DIR] [link_bench flags...]     (BUILD_DIR default: build)
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
shift || true
bin=$build/bench/link_bench
if [ ! -x "$bin" ]; then
  echo "link_bench.sh: $bin not found: build it first (cmake --build $build --target link_bench)" >&2
  exit 1
fi
echo "== peer link over gRPC =="
"$bin" --data_plane=grpc "$@"
echo "== peer link over UCX =="
"$bin" --data_plane=ucx "$@"
echo "== iperf3 on loopback (one TCP stream, 5 s) =="
if ! command -v iperf3 >/dev/null; then
  echo "iperf3 not installed (apt-get install iperf3): no ceiling measured"
  exit 0
fi
port=$((20000 + RANDOM % 20000))
iperf3 -s -1 -p "$port" >/dev/null 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
sleep 0.5
iperf3 -c 127.0.0.1 -p "$port" -t 5 -J | /usr/bin/python3 -c '
import json, sys
end = json.load(sys.stdin)["end"]
rx = end["sum_received"]["bits_per_second"] / 1e9
cpu = end["cpu_utilization_percent"]
host, remote = cpu["host_total"], cpu["remote_total"]
print(f"iperf3 {rx:.2f} Gbit/s received; CPU sender {host:.0f} %, receiver {remote:.0f} %")'
