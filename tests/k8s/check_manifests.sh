#!/bin/bash
# CI checks of the Kubernetes manifests (deploy/k8s), offline apart from `npm ci` the first time:
#   1. the generated overlays are up to date with deploy/pipelines/*.toml (generate.py --check);
#   2. every YAML file under deploy/k8s lints (tests/k8s/lint_yaml.py: parses, no repeated key,
#      no tab, no trailing blank);
#   3. kubectl kustomize renders the base, every overlay and every site-<site>/ of one;
#   4. every rendered object, and deploy/k8s/examples/*.yaml, validates against the Kubernetes
#      API schemas of the npm package kubernetes-models (and prometheus-operator's for the
#      ServiceMonitor), and fields their types do not have are refused (validate.js); a kind it
#      has no schema for is an error;
#   5. every field of every mapld config the manifests set (each rendered ConfigMap's
#      *.textproto, nested blocks included) is a field of proto/mapl/v1/config.proto, and every
#      file such a config names (token, certificates, socket) lies on a volume its StatefulSet
#      mounts into the mapld container.
# Needs /usr/bin/python3 with python3-yaml, kubectl with kustomize v5 (kubectl 1.27 or later),
# node and npm. Where one is missing it exits 77 (ctest: skipped), or fails when CI=true.
# The npm packages install with `npm ci` into tests/k8s/validate/node_modules (git-ignored),
# again only when package-lock.json changes.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
k8s="$repo/deploy/k8s"
work=$(mktemp -d /tmp/mapl-k8s-check-XXXXXX)
trap 'rm -rf "$work"' EXIT
failed=0

missing() {
  echo "check_manifests: $1" >&2
  if [ "${CI:-}" = "true" ]; then exit 1; fi
  exit 77
}
step() { echo; echo "== $*"; }
fail() { echo "FAILED: $*"; failed=1; }

command -v kubectl >/dev/null || missing "kubectl not found: install it (bash deploy/install-deps.sh)"
command -v node >/dev/null || missing "node not found: install nodejs (bash deploy/install-deps.sh)"
command -v npm >/dev/null || missing "npm not found: install npm (bash deploy/install-deps.sh)"
/usr/bin/python3 -c 'import yaml' 2>/dev/null || missing "python3-yaml is not installed"
kustomize_version=$(kubectl version --client 2>/dev/null | sed -n 's/^Kustomize Version: v\([0-9]*\).*/\1/p')
if [ -z "$kustomize_version" ] || [ "$kustomize_version" -lt 5 ]; then
  echo "check_manifests: kubectl $(kubectl version --client 2>/dev/null | head -1) embeds" \
       "kustomize ${kustomize_version:-?} (components, labels and native sidecars need" \
       "kustomize v5, kubectl 1.27 or later: Debian 12's kubernetes-client 1.20 is too old;" \
       "get kubectl from https://pkgs.k8s.io). NOT CHECKED: skipped, also under CI, since no" \
       "package of Debian 12 can supply it." >&2
  exit 77
fi

# The validator's packages, installed once per package-lock.json.
validate="$here/validate"
lock_sum=$(sha256sum "$validate/package-lock.json" | cut -d' ' -f1)
if [ "$(cat "$validate/node_modules/.mapl-lock-sha256" 2>/dev/null)" != "$lock_sum" ]; then
  step "npm ci (tests/k8s/validate)"
  (cd "$validate" && npm ci --no-audit --no-fund --loglevel=error) ||
    missing "npm ci failed (no registry?)"
  echo "$lock_sum" > "$validate/node_modules/.mapl-lock-sha256"
fi

step "1. generated overlays up to date"
/usr/bin/python3 "$k8s/generate.py" --check || fail "generated overlays are out of date"

step "2. YAML lint"
/usr/bin/python3 "$here/lint_yaml.py" "$k8s" || fail "YAML lint"

step "3. render (kubectl kustomize)"
dirs=("$k8s/base")
for o in "$k8s"/overlays/*/; do
  dirs+=("${o%/}")
  for s in "$o"site-*/; do [ -d "$s" ] && dirs+=("${s%/}"); done
done
rendered=()
for d in "${dirs[@]}"; do
  name=${d#"$k8s/"}
  out="$work/$(echo "$name" | tr / _).yaml"
  if kubectl kustomize "$d" > "$out" 2> "$work/err"; then
    echo "rendered $name: $(grep -c '^kind:' "$out") objects"
    rendered+=("$out")
    /usr/bin/python3 "$here/lint_yaml.py" "$out" > "$work/lint" || {
      cat "$work/lint"; fail "rendered $name does not lint"; }
  else
    cat "$work/err"; fail "kubectl kustomize $name"
  fi
done

step "4. validate against the Kubernetes API schemas (kubernetes-models)"
node "$validate/validate.js" "${rendered[@]}" "$k8s"/examples/*.yaml > "$work/validate" 2>&1
rc=$?
grep -v '^ok ' "$work/validate"
[ "$rc" -eq 0 ] || fail "schema validation"

step "5. config fields exist in config.proto; the files they name are mounted"
/usr/bin/python3 "$here/check_config_fields.py" --proto "$repo/proto/mapl/v1/config.proto" \
  $(printf -- '--yaml %s ' "${rendered[@]}") || fail "config fields"

echo
if [ "$failed" -ne 0 ]; then echo "check_manifests: FAILED"; exit 1; fi
echo "check_manifests: all checks passed"
