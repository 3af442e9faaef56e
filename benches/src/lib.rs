//! Whole-system and micro benchmarks for Haven; each prints a table with a baseline measured in
//! the same run. See the binaries in `src/bin/`.
