#!/usr/bin/env bash
# buildah_run.sh [buildah run options] CONTAINER -- COMMAND [ARGS]: `buildah run` that passes
# SIGTERM and SIGINT on to COMMAND, so that a launcher stopping it stops COMMAND the way it
# stops a process of its own (mapld drains, then exits 0). buildah 1.28 with chroot isolation
# answers SIGTERM by killing the process it runs (it exits "on killed", a daemon would not
# drain); chroot isolation keeps the host's PID namespace, so this signals COMMAND itself: the
# first process under `buildah run` that is not buildah's (buildah-chroot-runtime, then
# buildah-chroot-exec, then COMMAND). Exits with buildah's status.
set -u
buildah run "$@" &
child=$!
forward() {
  local pid=$child
  # buildah re-executes itself from a memfd: comm "memfd:buildah-c".
  while [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == *buildah* ]]; do
    pid=$(pgrep -P "$pid" | head -n 1)
    [ -n "$pid" ] || return 0  # COMMAND has not started (or has ended)
  done
  kill -s "$1" "$pid" 2>/dev/null
}
trap 'forward TERM' TERM
trap 'forward INT' INT
while :; do
  wait "$child"
  rc=$?
  kill -0 "$child" 2>/dev/null || break
done
exit "$rc"
