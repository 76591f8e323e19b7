# Sourced by the scripts: shared cargo target dir outside the clone, tools on PATH.
export AOB_VENV="${AOB_VENV:-$HOME/.cache/aob/venv}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/aob/target}"
export AOB_NATS_SERVER="${AOB_NATS_SERVER:-$AOB_VENV/bin/nats-server}"
export PATH="$AOB_VENV/bin:$PATH"
