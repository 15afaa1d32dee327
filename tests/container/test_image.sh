#!/usr/bin/env bash
# shellcheck disable=SC2154  # c0, c1, c2: new_container sets them (printf -v)
# The container image, built and used for real with buildah (chroot isolation, vfs storage; root,
# no registry): builds it with deploy/image.sh, checks its configuration (non-root user mapl,
# HEALTHCHECK, ENTRYPOINT), runs mapld --help and `import mapl` in it, then
#   1. two daemons, each in a container of the image as its default user mapl, their configs
#      bind-mounted read-only and their sockets in one host directory bind-mounted into both,
#      carry boundary 0 over the host's loopback (chroot isolation shares the host's network);
#      mapl-health, in the image, reports both ready;
#   2. the two-stage example (examples/llama_pipeline/run.py, a tiny model, a few steps) trains
#      through two daemons in containers of the image. Its trainers run on this host, as root,
#      with the image's own Python package (copied out of the image); a daemon accepts only its
#      own uid on the local socket, so these two daemons run as root too (`buildah run --user
#      0:0`). That is the test's choice; the image's default user stays mapl (checked above).
#   3. the same example inside the trainer image (deploy/image.sh --trainer; skipped where it
#      is not built: MAPL_IMAGE_SKIP_BUILD=1),
#      daemons and trainers in one container as its user mapl.
# The example's driver is run_example.py; buildah_run.sh passes SIGTERM on to the daemons.
# Not in ctest (it takes many minutes): run it as root, `bash tests/container/test_image.sh`.
# MAPL_IMAGE_SKIP_BUILD=1 uses the image already built.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
export BUILDAH_ISOLATION=chroot STORAGE_DRIVER=vfs
IMAGE=${MAPL_IMAGE:-mapl:latest}
[ "$(id -u)" -eq 0 ] || { echo "test_image.sh: needs root (buildah)" >&2; exit 1; }
start=$(date +%s)
passed=0
failed=0
pass() { echo "PASS: $*"; passed=$((passed + 1)); }
fail() { echo "FAIL: $*"; failed=$((failed + 1)); }
finish() {
  echo "test_image.sh: $(($(date +%s) - start)) s"
  echo "$passed passed, $failed failed"
  [ "$failed" -eq 0 ]
  exit
}

work=$(mktemp -d /tmp/mapl-image-XXXXXX)
containers=()
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null; done
  for c in "${containers[@]}"; do
    buildah umount "$c" >/dev/null 2>&1
    buildah rm "$c" >/dev/null 2>&1
  done
  rm -rf "$work"
}
trap cleanup EXIT

# ---- the image ----
if [ "${MAPL_IMAGE_SKIP_BUILD:-0}" != 1 ]; then
  t=$(date +%s)
  if bash "$repo/deploy/image.sh" --trainer >"$work/image.log" 2>&1; then
    pass "deploy/image.sh --trainer built $IMAGE and the trainer image in $(($(date +%s) - t)) s"
    grep -E '^image.sh: ' "$work/image.log" | sed 's/^/  /'
  else
    tail -n 40 "$work/image.log"
    fail "deploy/image.sh"
    finish
  fi
fi
buildah images "$IMAGE" | sed 's/^/  /'

inspect() { buildah inspect --type image --format "$1" "$IMAGE"; }
config=$(inspect '{{.Docker.Config.User}}|{{.Docker.Config.Entrypoint}}|{{.Docker.Config.Cmd}}|'\
'{{.Docker.Config.ExposedPorts}}')
echo "  user|entrypoint|cmd|ports: $config"
[[ "$config" == "mapl|[mapld]|[--config /etc/mapl/mapld.textproto]|"*7000/tcp*9400/tcp* ]] &&
  pass "image config: user mapl, ENTRYPOINT mapld, CMD --config, ports 7000 and 9400" ||
  fail "image config: $config"
health=$(inspect '{{.Docker.Config.Healthcheck}}')
echo "  healthcheck: $health"
[[ "$health" == *"mapl-health --socket /run/mapl/mapld.sock --service liveness"* ]] &&
  pass "the image keeps its HEALTHCHECK (docker format)" || fail "no HEALTHCHECK in the image"

new_container() {  # new_container VAR [IMAGE]: a working container, removed at exit
  local c
  c=$(buildah from --pull=never "${2:-$IMAGE}") || { fail "buildah from ${2:-$IMAGE}"; finish; }
  containers+=("$c")
  # The test binds host directories at the image's VOLUMEs; `buildah run` (1.28) also mounts an
  # anonymous volume there, at times over the bind (docker and podman let the bind win), so
  # these working containers drop the VOLUMEs.
  buildah config --volume /run/mapl- --volume /var/lib/mapl- "$c"
  printf -v "$1" '%s' "$c"
}
new_container c0
new_container c1

uid=$(buildah run "$c0" -- id -u)
user=$(buildah run "$c0" -- id -un)
[ -n "$uid" ] && [ "$uid" != 0 ] && [ "$user" = mapl ] &&
  pass "runs as non-root by default: $user, uid $uid" || fail "default user: '$user' uid '$uid'"
env_path=$(buildah run "$c0" -- sh -c 'echo "${PYTHONPATH:-unset}"')
where=$(buildah run "$c0" -- python3 -c 'import mapl, mapl.launch; print(mapl.__file__)' 2>&1)
[ "$env_path" = unset ] && [[ "$where" == /usr/lib/python3/dist-packages/mapl/* ]] &&
  pass "python3 imports mapl with no PYTHONPATH: $where" ||
  fail "import mapl: $where (PYTHONPATH $env_path)"
help=$(buildah run "$c0" -- mapld --help 2>&1)
grep -q -- "--config" <<<"$help" && pass "mapld --help lists its flags" ||
  fail "mapld --help: $help"

# ---- 1. two daemons as the image's user, mapl-health in the image ----
mkdir -p "$work/etc" "$work/run"
chown "$uid" "$work/run"
chmod 0700 "$work/run"
token=$(head -c 24 /dev/urandom | base64 | tr -d '/+=')
daemon_config() {  # daemon_config STAGE ROLE [PEER_ADDRESS]
  cat <<EOF
stage: $1
local_socket: "/run/mapl/s$1.sock"
metrics_address: "127.0.0.1:0"
auth_token: "$token"
$([ "$2" = ROLE_DOWNSTREAM ] && echo 'peer_listen: "127.0.0.1:0"')
boundaries {
  id: 0
  role: $2
  $([ -n "${3:-}" ] && echo "peer_address: \"$3\"")
  d: 512
  k: 32
  method: METHOD_MAPL
  forward_codec: CODEC_BF16
  backward_codec: CODEC_INT8
  vocab: 256
  max_tokens: 1024
}
EOF
}
start_daemon() {  # start_daemon CONTAINER STAGE: mapld in the container, its pid in $pids
  "$here/buildah_run.sh" -v "$work/etc:/etc/mapl:ro" -v "$work/run:/run/mapl" "$1" -- \
    mapld --config "/etc/mapl/stage$2.textproto" --ready_file "/run/mapl/s$2.ready.json" \
    >"$work/mapld$2.log" 2>&1 &
  pids+=($!)
}
wait_ready() {  # wait_ready STAGE: the daemon's ready file, or fail after 30 s
  local deadline=$((SECONDS + 30))
  while [ $SECONDS -lt $deadline ]; do
    [ -s "$work/run/s$1.ready.json" ] && { cat "$work/run/s$1.ready.json"; return 0; }
    sleep 0.1
  done
  ls -la "$work/run" >&2
  tail -n 20 "$work/mapld$1.log" >&2
  return 1
}
daemon_config 1 ROLE_DOWNSTREAM >"$work/etc/stage1.textproto"
chmod 0644 "$work/etc/stage1.textproto"
start_daemon "$c1" 1
if ready1=$(wait_ready 1); then
  port=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["peer_port"])' "$ready1")
  daemon_config 0 ROLE_UPSTREAM "127.0.0.1:$port" >"$work/etc/stage0.textproto"
  chmod 0644 "$work/etc/stage0.textproto"
  start_daemon "$c0" 0
  wait_ready 0 >/dev/null &&
    pass "two daemons of the image started as mapl (stage 1 listens on 127.0.0.1:$port)" ||
    fail "the stage 0 daemon did not start"
else
  fail "the stage 1 daemon did not start"
fi
probe() {  # probe CONTAINER STAGE [ARGS]: mapl-health in the container, as the image's user
  buildah run -v "$work/run:/run/mapl" "$1" -- mapl-health --socket "/run/mapl/s$2.sock" "${@:3}"
}
for s in 0 1; do
  c=$c0; [ "$s" = 1 ] && c=$c1
  out=""
  deadline=$((SECONDS + 30))
  while [ $SECONDS -lt $deadline ]; do
    out=$(probe "$c" "$s" 2>&1) && break
    sleep 0.5
  done
  [ "$out" = "readiness: SERVING" ] && pass "mapl-health in the image: stage $s $out" ||
    fail "mapl-health stage $s: $out"
done
out=$(probe "$c0" 0 --service liveness 2>&1) && pass "the HEALTHCHECK's probe: stage 0 $out" ||
  fail "liveness: $out"
# SIGTERM to the wrapper reaches mapld (it drains and exits 0), so a launcher can stop it.
codes=""
for pid in "${pids[@]}"; do kill -TERM "$pid"; done
for pid in "${pids[@]}"; do wait "$pid"; codes+="$? "; done
pids=()
[ "$codes" = "0 0 " ] && pass "SIGTERM through buildah_run.sh: both daemons drained and exited 0" ||
  { fail "daemon exit codes after SIGTERM: $codes"; tail -n 5 "$work"/mapld*.log; }

# ---- 2. the two-stage example through daemons in containers ----
mnt=$(buildah mount "$c0") && cp -a "$mnt/usr/lib/python3/dist-packages/mapl" "$work/py-mapl" &&
  buildah umount "$c0" >/dev/null || fail "copying the image's Python package"
mkdir -p "$work/py" && mv "$work/py-mapl" "$work/py/mapl"
[ -e /usr/bin/mapld ] &&
  echo "  note: this host has /usr/bin/mapld too; the daemons still run in the containers"
t=$(date +%s)
if env -u PYTHONPATH MAPLD=/usr/bin/mapld PYTHONPATH="$work/py" OPENBLAS_NUM_THREADS=1 \
     /usr/bin/python3 -u "$here/run_example.py" "$repo/examples" "$work/example" \
     "$here/buildah_run.sh" "$c0" "$c1" >"$work/example.log" 2>&1 &&
   grep -qx "mapl from $work/py/mapl/__init__.py" "$work/example.log"; then
  pass "the two-stage example, trainers on the host, daemons in the image's containers" \
    "($(($(date +%s) - t)) s): $(tail -n 1 "$work/example.log")"
else
  tail -n 40 "$work/example.log"
  fail "the two-stage example through the image's daemons"
fi

# ---- 3. the example inside the trainer image, as its user mapl (when the image is built) ----
TRAINER_IMAGE=${MAPL_TRAINER_IMAGE:-mapl-trainer:latest}
if buildah inspect --type image "$TRAINER_IMAGE" >/dev/null 2>&1; then
  new_container c2 "$TRAINER_IMAGE"
  t=$(date +%s)
  if buildah run -v "$here:/opt/mapl-test:ro" "$c2" -- \
       python3 -u /opt/mapl-test/run_example.py /opt/mapl/examples /tmp/mapl-example \
       >"$work/trainer.log" 2>&1 &&
     grep -qx "mapl from /usr/lib/python3/dist-packages/mapl/__init__.py" "$work/trainer.log"; then
    pass "the two-stage example inside $TRAINER_IMAGE as $(buildah run "$c2" -- id -un)," \
      "its daemons beside it ($(($(date +%s) - t)) s): $(tail -n 1 "$work/trainer.log")"
  else
    tail -n 40 "$work/trainer.log"
    fail "the two-stage example inside $TRAINER_IMAGE"
  fi
else
  echo "  ($TRAINER_IMAGE not built: bash deploy/image.sh --trainer builds it)"
fi
finish
