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
# RocksDB checksums every block and WAL record with CRC32C; built without SSE4.2 and PCLMUL it
# falls back to a table-driven loop that took 14% of the machine's CPU in a 1 MiB write
# benchmark (perf, issue 13). Only C++ reads CXXFLAGS here (RocksDB), so Rust builds are unaffected;
# the flags are added only where the CPU has both instructions.
if grep -qw sse4_2 /proc/cpuinfo 2>/dev/null && grep -qw pclmulqdq /proc/cpuinfo 2>/dev/null; then
  case " ${CXXFLAGS:-} " in
    *" -msse4.2 "*) ;;
    *) export CXXFLAGS="${CXXFLAGS:+$CXXFLAGS }-msse4.2 -mpclmul" ;;
  esac
fi
export CARGO_INCREMENTAL=0
if command -v sccache >/dev/null 2>&1; then
  export RUSTC_WRAPPER="${RUSTC_WRAPPER:-sccache}"
  export SCCACHE_DIR="${SCCACHE_DIR:-$HOME/.cache/sccache}"
  export SCCACHE_CACHE_SIZE="${SCCACHE_CACHE_SIZE:-20G}"
fi
# Binaries the tests and `havenctl dev up` start.
export PATH="$CARGO_TARGET_DIR/debug:$PATH"
