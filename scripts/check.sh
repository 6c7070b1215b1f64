#!/usr/bin/env bash
# The quality gates, one command each (CI runs them all):
#   scripts/check.sh lint      luacheck on lua/ scripts/ spec/, clang-format check of the C tree
#   scripts/check.sh analyze   clang-tidy and cppcheck on src/ (zero findings)
#   scripts/check.sh asan      AddressSanitizer + UBSan build, the whole suite under it
#   scripts/check.sh tsan      ThreadSanitizer build, the pool/future/codec/stress specs under it
#   scripts/check.sh valgrind  memcheck over the reference scripts and a stress workout
#   scripts/check.sh oom       allocation failures driven through the codec, futures, submit
#   scripts/check.sh fuzz      the decoder fuzz target for $FUZZ_SECONDS (default 60)
#   scripts/check.sh all       every one of them, in that order
#   scripts/check.sh packages  install the Debian packages the checks need
# Each builds in its own build-NAME/ directory and exits non-zero on any finding.
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=$(nproc)

packages() {
  local want=(clang libclang-rt-14-dev clang-tidy clang-format cppcheck valgrind lua-check)
  local missing=()
  for p in "${want[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    local sudo=""
    [[ $(id -u) -eq 0 ]] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
}

c_files() { ls src/*.c src/*.h src/kernels/*.c src/kernels/*.h spec/fuzz/*.c; }

lint() {
  luacheck --formatter plain lua scripts spec .busted
  clang-format --dry-run -Werror $(c_files)
  echo "lint: clean"
}

configure() { # build-dir, cmake args...
  local dir=$1
  shift
  cmake -S . -B "$dir" -DLUAPOOL_WERROR=ON "$@" >/dev/null
  cmake --build "$dir" -j"$JOBS"
}

analyze() {
  configure build -DCMAKE_EXPORT_COMPILE_COMMANDS=ON
  clang-tidy --quiet -p build src/*.c src/kernels/*.c
  cppcheck --enable=warning,performance,portability --std=c11 --quiet --inline-suppr \
    --platform=unix64 -D_GNU_SOURCE -DLLONG_MAX=9223372036854775807LL -I src -I build/gen \
    --suppress=missingIncludeSystem --error-exitcode=1 src
  echo "analyze: clean"
}

# Runs ctest in a sanitizer build; any report (host or worker) fails it.
sanitized_ctest() { # build-dir, ctest args...
  local dir=$1
  shift
  rm -rf "$dir/sanitizer-logs" && mkdir -p "$dir/sanitizer-logs"
  ctest --test-dir "$dir" --output-on-failure "$@"
  if compgen -G "$dir/sanitizer-logs/*" >/dev/null; then
    echo "sanitizer reports:" && cat "$dir"/sanitizer-logs/*
    return 1
  fi
}

asan() {
  configure build-asan -DLUAPOOL_ASAN=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo
  sanitized_ctest build-asan -j2
  echo "asan: clean"
}

tsan() {
  configure build-tsan -DLUAPOOL_TSAN=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo
  # failures_spec's deadlines (0.3 s) do not fit TSan's slowdown; it runs
  # under ASan, and its thread paths are the ones exercised here
  sanitized_ctest build-tsan -j2 -R 'pool_spec|futures_spec|codec_spec|worker_api_spec|kernels_spec|stress_spec'
  echo "tsan: clean"
}

valgrind_check() {
  configure build -DCMAKE_BUILD_TYPE=RelWithDebInfo
  local vg=(valgrind -q --leak-check=full --errors-for-leak-kinds=definite,indirect
            --show-leak-kinds=definite,indirect --error-exitcode=1 --trace-children=yes)
  "${vg[@]}" build/luapool scripts/cpu.lua
  "${vg[@]}" build/luapool scripts/demo.lua --urls 5 --delay 0.05
  "${vg[@]}" build/luapool spec/memcheck/stress.lua 2000
  echo "valgrind: clean"
}

oom() {
  configure build-oom -DLUAPOOL_TEST_ALLOC=ON -DLUAPOOL_ASAN=ON -DCMAKE_BUILD_TYPE=Debug
  ASAN_OPTIONS=detect_leaks=1 build-oom/luapool spec/oom/oom.lua
}

fuzz() {
  configure build-fuzz -DCMAKE_C_COMPILER=clang -DLUAPOOL_FUZZ=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo
  build-fuzz/spec/fuzz/codec_fuzz -max_total_time="${FUZZ_SECONDS:-60}" -rss_limit_mb=2048 \
    -artifact_prefix=build-fuzz/ build-fuzz/spec/fuzz/corpus 2>&1 | tail -n 3
}

timed() {
  local start=$SECONDS
  echo "== $1"
  "$@"
  echo "== $1 took $((SECONDS - start)) s"
}

case "${1:-}" in
  packages) packages ;;
  lint) lint ;;
  analyze) analyze ;;
  asan) asan ;;
  tsan) tsan ;;
  valgrind) valgrind_check ;;
  oom) oom ;;
  fuzz) fuzz ;;
  all)
    for c in lint analyze asan tsan valgrind_check oom fuzz; do timed "$c"; done ;;
  *)
    sed -n '2,13p' "$0" >&2
    exit 2 ;;
esac
