#!/usr/bin/env bash
# The quality gates, one command each (CI runs them all):
#   scripts/check.sh lint      luacheck on lua/ scripts/ spec/, clang-format check of the C tree,
#                              and the include-cycle check below
#   scripts/check.sh cycles    fails (printing it) on a cycle in src/'s #include "..." graph
#   scripts/check.sh analyze   clang-tidy and cppcheck on src/ (zero findings)
#   scripts/check.sh asan      AddressSanitizer + UBSan build, the whole suite under it (core_test too)
#   scripts/check.sh tsan      ThreadSanitizer build, core_test and the pool/future/codec/stress specs
#   scripts/check.sh valgrind  memcheck over the reference scripts and a stress workout
#   scripts/check.sh oom       Lua and C allocation failures driven through the codec, futures,
#                              submit (spec/oom/oom.lua), and the core's C scenarios (core_test)
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

c_files() { { find src spec/fuzz -name '*.[ch]'; echo spec/core_test.c; } | sort; }

lint() {
  luacheck --formatter plain lua scripts spec .busted
  clang-format --dry-run -Werror $(c_files)
  cycles
  echo "lint: clean"
}

# The layers of src/ (docs/architecture.md) hold only while no module
# includes, directly or not, a module that includes it back.  A module is a
# .c and its .h taken as one node (foo.c and foo.h are "foo"), so that a
# cycle through the code (codec.c uses the kernel table, a kernel uses the
# codec) is seen even though no header includes itself.  #include "x" is
# resolved as the compiler does: the including file's directory first, then
# the -I root src/; a name found in neither (build/gen's embedded Lua, a
# system header) is no edge.
cycles() {
  lua5.4 - src <<'LUA'
local root = arg[1]
local function exists(p)
  local f = io.open(p, "r")
  if f then f:close() end
  return f ~= nil
end
local function module(p) return (p:gsub("^" .. root .. "/", ""):gsub("%.[ch]$", "")) end
local files = {}
for p in io.popen("find " .. root .. " -name '*.[ch]' | sort"):lines() do files[#files + 1] = p end
local edges, names = {}, {}
for _, p in ipairs(files) do
  local from = module(p)
  edges[from] = edges[from] or {}
  names[#names + 1] = from
  local dir = p:match("^(.*)/[^/]*$")
  local n = 0
  for line in io.lines(p) do
    n = n + 1
    local inc = line:match('^%s*#%s*include%s*"([^"]+)"')
    if inc then
      local target = exists(dir .. "/" .. inc) and dir .. "/" .. inc
        or exists(root .. "/" .. inc) and root .. "/" .. inc
      if target then
        target = target:gsub("/%./", "/")
        local k
        repeat target, k = target:gsub("[^/]+/%.%./", "", 1) until k == 0
        local to = module(target)
        if to ~= from and not edges[from][to] then
          edges[from][to] = p .. ":" .. n
          edges[from][#edges[from] + 1] = to
        end
      end
    end
  end
end
table.sort(names)
local state, stack = {}, {}
local function visit(m)
  state[m] = "open"
  stack[#stack + 1] = m
  for _, to in ipairs(edges[m] or {}) do
    if state[to] == "open" then
      local i = #stack
      while stack[i] ~= to do i = i - 1 end
      io.stderr:write("include cycle:\n")
      for j = i, #stack do
        local a, b = stack[j], stack[j + 1] or to
        io.stderr:write(("  %s -> %s  (%s)\n"):format(a, b, edges[a][b]))
      end
      os.exit(1)
    elseif not state[to] then
      visit(to)
    end
  end
  stack[#stack] = nil
  state[m] = "done"
end
for _, m in ipairs(names) do
  if not state[m] then visit(m) end
end
print("cycles: none in " .. #files .. " files")
LUA
}

configure() { # build-dir, cmake args...
  local dir=$1
  shift
  cmake -S . -B "$dir" -DLUAPOOL_WERROR=ON "$@" >/dev/null
  cmake --build "$dir" -j"$JOBS"
}

analyze() {
  configure build -DCMAKE_EXPORT_COMPILE_COMMANDS=ON
  clang-tidy --quiet -p build $(find src -name '*.c' | sort)
  cppcheck --enable=warning,performance,portability --std=c11 --quiet --inline-suppr \
    --platform=unix64 -D_GNU_SOURCE -DLLONG_MAX=9223372036854775807LL -I src -I build/gen \
    --suppress=missingIncludeSystem --error-exitcode=1 src
  echo "analyze: clean"
}

# Runs ctest in a sanitizer build; any report (host or worker) fails it.
# One line is not a report: LeakSanitizer's stop-the-world at a process's
# exit sometimes fails to read a thread's registers and says only "Unable
# to get registers from thread N." (a known race of the tool, not a leak:
# llvm/llvm-project#116555 made it a verbose-only message).  A log holding
# nothing else is shown and dropped; a leak found by that check is still
# a report of its own.
sanitized_ctest() { # build-dir, ctest args...
  local dir=$1
  shift
  rm -rf "$dir/sanitizer-logs" && mkdir -p "$dir/sanitizer-logs"
  ctest --test-dir "$dir" --output-on-failure "$@"
  local log
  for log in "$dir"/sanitizer-logs/*; do
    [[ -f $log ]] || continue
    if ! grep -qvE '^==[0-9]+==Unable to get registers from thread [0-9]+\.$' "$log"; then
      echo "sanitizer: $(basename "$log") holds only LeakSanitizer's register-read race, dropped: $(cat "$log")"
      rm -f "$log"
    fi
  done
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
  # core_test: the future/queue/pool core's races through fake engines, no Lua
  # One at a time: codec_spec's 100 MiB strings beside iopool_spec's 10,000
  # connections, both under TSan's shadow memory, once left TSan no memory
  # to start a process ("ThreadSanitizer failed to allocate ...").
  # iopool_spec's 10,000-connection case runs 1,000 under a sanitizer
  # (LUAPOOL_SANITIZER): 10,000 outlasted the 300 s test timeout under TSan.
  sanitized_ctest build-tsan -j1 \
    -R '^(core_test|pool_spec|futures_spec|codec_spec|worker_api_spec|kernels_spec|stress_spec|iopool_spec|bigvalue_spec|pipeline_spec)$'
  echo "tsan: clean"
}

valgrind_check() {
  configure build -DCMAKE_BUILD_TYPE=RelWithDebInfo
  # Children traced (process workers), but not the nginx fixture: its own
  # regex compilation leaks a few bytes at start, which is nginx's, not ours.
  local vg=(valgrind -q --leak-check=full --errors-for-leak-kinds=definite,indirect
            --show-leak-kinds=definite,indirect --error-exitcode=1 --trace-children=yes
            --trace-children-skip='*/nginx')
  "${vg[@]}" build/luapool scripts/cpu.lua
  "${vg[@]}" build/luapool scripts/demo.lua --urls 5 --delay 0.05
  "${vg[@]}" build/luapool spec/memcheck/stress.lua 2000
  echo "valgrind: clean"
}

oom() {
  configure build-oom -DLUAPOOL_TEST_ALLOC=ON -DLUAPOOL_ASAN=ON -DCMAKE_BUILD_TYPE=Debug
  ASAN_OPTIONS=detect_leaks=1 build-oom/luapool spec/oom/oom.lua
  # the core's C allocations failed one by one in pools of fake engines
  ASAN_OPTIONS=detect_leaks=1 build-oom/spec/core_test
  # an MPI rank with no memory for a reply (pending in a build without MPI)
  ctest --test-dir build-oom -R '^mpi_oom_spec$' --output-on-failure
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
  cycles) cycles ;;
  analyze) analyze ;;
  asan) asan ;;
  tsan) tsan ;;
  valgrind) valgrind_check ;;
  oom) oom ;;
  fuzz) fuzz ;;
  all)
    for c in lint analyze asan tsan valgrind_check oom fuzz; do timed "$c"; done ;;
  *)
    sed -n '2,15p' "$0" >&2
    exit 2 ;;
esac
