#!/usr/bin/env bash
# Carries Triton's compile cache between GPU machines: the GPU tests are compile-bound (a cold
# machine spends most of a 10-minute call compiling), and each lent machine starts bare.
#   bash bench/triton_cache.sh load [PARTS_DIR]   # unpack PARTS_DIR/triton-cache.tgz.part-* (default
#                                                 # .gpu/triton-cache) into $TRITON_CACHE_DIR
#   bash bench/triton_cache.sh save OUT_DIR [MAX_MB]   # pack $TRITON_CACHE_DIR into OUT_DIR as
#                                                 # 15 MiB parts (nothing if over MAX_MB, default 45)
# The device tool returns at most 8 files of 16 MiB from $OUT; copy the parts into
# .gpu/triton-cache/ here (ignored by git) and name .gpu in the next call's `carry`.
# Triton keys its cache on kernel source, constants, options, its version and the GPU, so a
# stale entry is never used; everything here is best effort and never fails the caller.
set -u
cache=${TRITON_CACHE_DIR:-}
case "${1:-}" in
  load)
    [ -n "$cache" ] || { echo "triton cache: TRITON_CACHE_DIR is not set" >&2; exit 0; }
    parts=${2:-.gpu/triton-cache}
    mkdir -p "$cache"
    if ls "$parts"/triton-cache.tgz.part-* >/dev/null 2>&1; then
      cat "$parts"/triton-cache.tgz.part-* | tar xzf - -C "$cache" 2>/dev/null \
        && echo "triton cache: $(find "$cache" -type f | wc -l) files loaded" \
        || echo "triton cache: could not unpack $parts (compiling from scratch)"
    fi
    ;;
  save)
    out=${2:?save OUT_DIR}
    max_mb=${3:-45}
    [ -n "$cache" ] && [ -d "$cache" ] || exit 0
    tmp=$(mktemp -d)
    tar czf "$tmp/all.tgz" -C "$cache" . 2>/dev/null || { rm -rf "$tmp"; exit 0; }
    mb=$(( $(stat -c %s "$tmp/all.tgz") / 1048576 ))
    if [ "$mb" -le "$max_mb" ]; then
      split -b 15m -d "$tmp/all.tgz" "$out/triton-cache.tgz.part-"
      echo "triton cache: ${mb} MiB saved to $out"
    else
      echo "triton cache: ${mb} MiB, over ${max_mb} MiB: not saved"
    fi
    rm -rf "$tmp"
    ;;
  *)
    echo "usage: bench/triton_cache.sh load [PARTS_DIR] | save OUT_DIR [MAX_MB]" >&2
    exit 2
    ;;
esac
exit 0
