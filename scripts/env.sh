# Shared by scripts/demo and scripts/test: one persistent build folder, so the (slow) DataFusion
# build is reused between clones on the same machine. Override with CARGO_TARGET_DIR.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/clvflow/target}"
mkdir -p "$CARGO_TARGET_DIR"
