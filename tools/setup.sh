#!/usr/bin/env bash
# Set up a fresh machine of the project's kind (Debian 12, Python 3.11, no GPU) for the reference profile.
# Safe to re-run: every step checks before it acts.
#   - Debian packages: libpython3.11 (the Triton stub links it), python3.11-venv, libb64-0d (perf_analyzer),
#     prometheus (promtool, for the alert-rule tests), haproxy (the balancer of the scale-out test)
#   - .venv made with Debian's python3.11 (the Triton Python stub embeds that interpreter)
#   - Python requirements (requirements.txt, requirements-nodeps.txt)
#   - .venv-lint: the Kubernetes manifest checkers (requirements-lint.txt: kubernetes-validate, checkov), apart
#     because checkov pins versions (packaging) the stack's own venv must not take
#   - .triton/: tritonserver 2.51 binary + Python backend + stub, laid out as a backend directory
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
TRITON_HOME="${TRITON_HOME:-$ROOT/.triton}"
log() { printf '[setup] %s\n' "$*"; }

need_debs=()
for pkg in libpython3.11 python3.11-venv libb64-0d prometheus haproxy; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_debs+=("$pkg")
done
if ((${#need_debs[@]})); then
  log "installing Debian packages: ${need_debs[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_debs[@]}"
fi

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV with /usr/bin/python3.11"
  /usr/bin/python3.11 -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
stamp="$VENV/.requirements.sha256"
want="$(cat "$ROOT/requirements.txt" "$ROOT/requirements-nodeps.txt" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing Python requirements (progress below)"
  "${PIP[@]}" install --progress-bar off -r "$ROOT/requirements.txt"
  "${PIP[@]}" install --progress-bar off --no-deps -r "$ROOT/requirements-nodeps.txt"
  echo "$want" > "$stamp"
else
  log "Python requirements already installed"
fi

LINT_VENV="${LINT_VENV:-$ROOT/.venv-lint}"
lint_want="$(sha256sum "$ROOT/requirements-lint.txt" | cut -d' ' -f1)"
if [ "$(cat "$LINT_VENV/.requirements.sha256" 2>/dev/null)" != "$lint_want" ]; then
  log "installing the manifest checkers into $LINT_VENV"
  [ -x "$LINT_VENV/bin/python" ] || /usr/bin/python3.11 -m venv "$LINT_VENV"
  "$LINT_VENV/bin/python" -m pip --disable-pip-version-check install -q --progress-bar off -r "$ROOT/requirements-lint.txt"
  echo "$lint_want" > "$LINT_VENV/.requirements.sha256"
fi

SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
PT="$SITE/pytriton/tritonserver"
if [ ! -x "$TRITON_HOME/bin/tritonserver" ] || [ "$PT/bin/tritonserver" -nt "$TRITON_HOME/bin/tritonserver" ]; then
  log "laying out Triton 2.51 in $TRITON_HOME"
  rm -rf "$TRITON_HOME"
  mkdir -p "$TRITON_HOME/bin" "$TRITON_HOME/backends/python" "$TRITON_HOME/caches/local"
  cp "$PT/bin/tritonserver" "$TRITON_HOME/bin/"
  cp "$PT/backends/python/libtriton_python.so" "$PT/backends/python/triton_python_backend_utils.py" \
     "$TRITON_HOME/backends/python/"
  cp "$PT/python_backend_stubs/3.11/triton_python_backend_stub" "$TRITON_HOME/backends/python/"
  cp "$PT/caches/local/libtritoncache_local.so" "$TRITON_HOME/caches/local/"
  ln -sfn "$SITE/nvidia_pytriton.libs" "$TRITON_HOME/lib"
fi
"${PIP[@]}" install --no-deps --no-build-isolation -q -e "$ROOT"   # the ragstack package, for the Triton stubs
log "ready: tritonserver 2.51 in $TRITON_HOME, venv $VENV"
