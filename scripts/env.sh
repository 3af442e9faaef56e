# Sourced by the other scripts: makes sure this machine can build Haven and sets up a shared,
# cached build. Safe to source repeatedly.
#
# - librocksdb-sys generates its bindings with libclang (Debian: libclang-dev), which a fresh
#   machine lacks; sccache (Debian: sccache) caches Rust and RocksDB's C++ between builds.
# - CARGO_TARGET_DIR defaults to a directory outside the clone so every clone and CI run reuses
#   one build (a cold build compiles RocksDB for ~13 minutes).

haven_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

haven_need_packages=()
if ! dpkg -s libclang-dev >/dev/null 2>&1 && ! ls /usr/lib/llvm-*/lib/libclang.so >/dev/null 2>&1; then
  haven_need_packages+=(libclang-dev)
fi
command -v sccache >/dev/null 2>&1 || haven_need_packages+=(sccache)
if [ ${#haven_need_packages[@]} -gt 0 ]; then
  echo "haven: installing ${haven_need_packages[*]} (Debian packages)" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${haven_need_packages[@]}" >/dev/null
fi

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/haven-target}"
export CARGO_INCREMENTAL=0
if command -v sccache >/dev/null 2>&1; then
  export RUSTC_WRAPPER="${RUSTC_WRAPPER:-sccache}"
  export SCCACHE_DIR="${SCCACHE_DIR:-$HOME/.cache/sccache}"
  export SCCACHE_CACHE_SIZE="${SCCACHE_CACHE_SIZE:-20G}"
fi
# Binaries the tests and `havenctl dev up` start.
export PATH="$CARGO_TARGET_DIR/debug:$PATH"
