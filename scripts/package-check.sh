#!/usr/bin/env bash
# The ways luapool is installed, checked end to end (CI runs it):
#   1. the man page renders with no warning (man --warnings, groff -ww);
#   2. LuaRocks: `luarocks make` of a copy of this tree into a temporary
#      tree, offline; stock lua5.4 with that tree's paths runs a threadpool
#      and a processpool task (its workers are the tree's binary), and the
#      tree's bin/luapool runs scripts/cpu.lua (and, in a build with MPI,
#      finds its MPI plugin under `mpiexec -n 1 ... --mpi`);
#   3. CMake: `cmake --install --prefix` of the Debian build dir into a
#      temporary prefix, which is then moved: stock lua5.4 with the moved
#      prefix's paths runs both pools, its process workers the moved
#      bin/luapool (the module finds the bindir relative to itself);
#   4. Debian: a build dir configured for /usr, `cpack -G DEB`, the file
#      list and the control fields checked, the package installed with
#      dpkg -i, /usr/bin/luapool and stock lua5.4 (no LUA_PATH/LUA_CPATH)
#      run the seed jobs (and --mpi its plugin), `dpkg -r` removes every
#      file again.
# Everything is built in a temporary directory: build/ is not touched, and
# nothing stays installed (the package is removed on any exit).  Refuses to
# run when luapool is already installed under /usr.  Needs root for dpkg
# (sudo otherwise); installs the Debian packages it needs when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
src=$PWD
sudo=""
[[ $(id -u) -eq 0 ]] || sudo="sudo"

packages=(build-essential cmake pkg-config liblua5.4-dev lua5.4 libcurl4-openssl-dev
          luarocks groff-base man-db)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "package-check: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

version=$(sed -n 's/^#define LUAPOOL_VERSION "\(.*\)"$/\1/p' $(find src -name '*.h' | sort) | head -n 1)
rockspec=luapool-$version-1.rockspec
multiarch=$(gcc -print-multiarch)
work=$(mktemp -d)
installed=0
passed=0

# dpkg takes its lock without waiting; another apt/dpkg may hold it briefly.
dpkg_locked() { # dpkg args...
  local out
  for _ in $(seq 60); do
    if out=$($sudo dpkg "$@" 2>&1); then return 0; fi
    grep -q "lock" <<<"$out" || break
    sleep 2
  done
  echo "$out" >&2
  return 1
}
cleanup() {
  if ((installed)); then dpkg_locked -r luapool >/dev/null || echo "package-check: could not remove luapool" >&2; fi
  rm -rf "$work"
}
trap cleanup EXIT
fail() {
  echo "package-check: FAIL: $*" >&2
  exit 1
}
[[ -n $version ]] || fail "no #define LUAPOOL_VERSION found in src/**/*.h"

# The Lua files installed as they are (the rest of lua/luapool is compiled in).
plain_lua() {
  git ls-files 'lua/luapool/*.lua' | grep -v -e '^lua/luapool/executor\.lua$' -e '^lua/luapool/progress\.lua$'
}
pass() {
  passed=$((passed + 1))
  echo "package-check: ok: $*"
}
same() { # what, expected, actual
  [[ $2 == "$3" ]] || fail "$1: expected
$2
got
$3"
}

# The seed job and a smoke script for stock lua5.4, shared by 2 and 3.
cpu_expected="Calculation for 1000: 332833500
Calculation for 2000: 2664667000"
cpu_run() { # luapool binary
  local out
  out=$(cd "$work" && "$1" "$src/scripts/cpu.lua" --workers 2 1000 2000) || fail "$1 scripts/cpu.lua failed"
  same "$1 scripts/cpu.lua" "$cpu_expected" "$(grep -v 'execution time' <<<"$out")"
  grep -q '^processpool execution time: [0-9.]* seconds$' <<<"$out" || fail "$1 scripts/cpu.lua: no timing line"
}
cat >"$work/smoke.lua" <<'EOF'
-- stock lua5.4: where the module and the Lua files come from, and both pools
local luapool = require "luapool"
print("module", package.searchpath("luapool", package.cpath))
print("lua", package.searchpath("luapool.fixture", package.path))
print("version", luapool.version)
local function whoami(x)
  local f = assert(io.open("/proc/self/cmdline", "rb"))
  local exe = f:read("a"):match("^[^%z]*")
  f:close()
  return x * x, luapool.current_worker().kind, exe
end
do
  local t <close> = luapool.threadpool.new { max_workers = 2 }
  local sq, kind = t:submit(whoami, 7):result()
  print("thread", sq, kind)
end
do
  local p <close> = luapool.processpool.new { max_workers = 2 }
  print("process", p:submit(whoami, 9):result())
  print("kernel", p:map(luapool.kernels.sum_squares, { 1000, 2000 })[2])
end
EOF
# --mpi under `mpiexec -n 1` (when there is one): the binary finds its MPI
# plugin, which maps libmpi in rank 0 and in no worker.
cat >"$work/mpi.lua" <<'EOF'
local function mapped()
  local f = assert(io.open("/proc/self/maps"))
  local maps = f:read("a")
  f:close()
  return maps:find("/libmpi%.so") ~= nil, maps:match("%S*/luapool%-mpi%.so") or "-"
end
local pool <close> = processpool.new { max_workers = 1 }
print(mapped())
print(pool:submit(mapped):result())
EOF
mpi_run() { # luapool binary, expected plugin path
  command -v mpiexec >/dev/null || { echo "package-check: no mpiexec: $1 --mpi not run"; return 0; }
  local out
  out=$(cd "$work" && env OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \
    OMPI_MCA_rmaps_base_oversubscribe=true OMPI_MCA_btl=self,vader \
    timeout 120 mpiexec -n 1 "$1" --mpi mpi.lua 2>&1 </dev/null) || fail "mpiexec -n 1 $1 --mpi: $out"
  same "mpiexec -n 1 $1 --mpi mpi.lua" "$(printf 'true\t%s\nfalse\t-' "$2")" "$out"
}
smoke_expected() { # module, lua dir, worker exe
  printf 'module\t%s\nlua\t%s\nversion\t%s\nthread\t49\tthread\nprocess\t81\tprocess\t%s\nkernel\t2664667000' \
    "$1" "$2/luapool/fixture.lua" "$version" "$3"
}

# 1. The man page: rendered, warnings are errors.
warnings=$(MANWIDTH=80 man --warnings -l docs/luapool.1 2>&1 >/dev/null)
same "man --warnings -l docs/luapool.1" "" "$warnings"
warnings=$(groff -man -ww -z docs/luapool.1 2>&1)
same "groff -man -ww -z docs/luapool.1" "" "$warnings"
grep -q "^LUAPOOL(1)" <<<"$(MANWIDTH=80 man -l docs/luapool.1 2>/dev/null)" || fail "man -l: no LUAPOOL(1) header"
pass "man page renders without warnings"

# 2. LuaRocks, offline, from a copy of the working tree (luarocks make
# builds in the directory it runs in).
mkdir "$work/src"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git ls-files -co --exclude-standard -z | tar -c --null -T - | tar -x -C "$work/src"
else
  tar -c --exclude='./build*' . | tar -x -C "$work/src"
fi
lint=$(cd "$work/src" && luarocks lint "$rockspec" 2>&1) || fail "luarocks lint $rockspec: $lint"
same "luarocks lint $rockspec" "" "$lint"
pass "luarocks lint $rockspec"
# No network but the loopback interface, up: FindMPI's `mpicc --showme`
# (Open MPI's opal_ifinit) warns on stderr with no interface at all, and
# CMake then finds no MPI and builds no plugin.
offline() { "$@"; }
if $sudo unshare -n true 2>/dev/null; then
  offline() { $sudo unshare -n sh -c 'ip link set lo up 2>/dev/null; exec "$@"' sh "$@"; }
fi
tree=$work/tree
(cd "$work/src" && offline luarocks --lua-version 5.4 make --tree "$tree" "$rockspec") >"$work/luarocks.log" 2>&1 ||
  { cat "$work/luarocks.log" >&2; fail "luarocks make"; }
[[ -z $sudo ]] || $sudo chown -R "$(id -u):$(id -g)" "$tree"
rockdir=$tree/lib/luarocks/rocks-5.4/luapool/$version-1
# a build with MPI (CMake says so) has its plugin in the rock's directory
rock_mpi=""
grep -q "luapool: mpipool with MPI" "$work/luarocks.log" && rock_mpi="${rockdir#"$tree"/}/libexec/luapool/luapool-mpi.so"
for f in bin/luapool lib/lua/5.4/luapool.so $(plain_lua | sed 's|^lua/|share/lua/5.4/|') \
         "${rockdir#"$tree"/}/bin/luapool" $rock_mpi; do
  [[ -e $tree/$f ]] || fail "luarocks make: $tree/$f missing"
done
for f in share/lua/5.4/luapool/executor.lua share/lua/5.4/luapool/progress.lua; do
  [[ ! -e $tree/$f ]] || fail "luarocks make: $f is compiled in, not installed"
done
out=$(cd "$work" && eval "$(luarocks --lua-version 5.4 --tree "$tree" path)" && lua5.4 smoke.lua 2>&1) ||
  fail "lua5.4 smoke.lua with the tree's paths: $out"
same "lua5.4 smoke.lua (LuaRocks tree)" \
  "$(smoke_expected "$tree/lib/lua/5.4/luapool.so" "$tree/share/lua/5.4" "$rockdir/bin/luapool")" "$out"
cpu_run "$tree/bin/luapool"
same "$tree/bin/luapool -v" "luapool $version" "$("$tree/bin/luapool" -v | cut -d' ' -f1-2)"
[[ -z $rock_mpi ]] || mpi_run "$tree/bin/luapool" "$tree/$rock_mpi"
pass "luarocks make --tree: stock lua5.4 runs both pools, bin/luapool runs scripts/cpu.lua${rock_mpi:+ and --mpi}"

# 3. and 4.: one build dir configured for /usr.
build=$work/build-deb
cmake -S . -B "$build" -DCMAKE_INSTALL_PREFIX=/usr -DCMAKE_BUILD_TYPE=Release -DLUAPOOL_TESTS=OFF >/dev/null
cmake --build "$build" -j"$(nproc)" >/dev/null

# 3. cmake --install into another prefix than configured, then moved (before
# the package puts a /usr/bin/luapool that a wrong fallback would find).
cmake --install "$build" --prefix "$work/prefix" >"$work/install.log" 2>&1 ||
  { cat "$work/install.log" >&2; fail "cmake --install --prefix"; }
mv "$work/prefix" "$work/moved"
moved=$work/moved
for f in bin/luapool "lib/$multiarch/lua/5.4/luapool.so" share/lua/5.4/luapool/fixture.lua; do
  [[ -e $moved/$f ]] || fail "cmake --install --prefix: $f missing"
done
out=$(cd "$work" && LUA_PATH="$moved/share/lua/5.4/?.lua;$moved/share/lua/5.4/?/init.lua;;" \
  LUA_CPATH="$moved/lib/$multiarch/lua/5.4/?.so;;" lua5.4 smoke.lua 2>&1) ||
  fail "lua5.4 smoke.lua with the moved prefix's paths: $out"
same "lua5.4 smoke.lua (cmake --install --prefix, moved)" \
  "$(smoke_expected "$moved/lib/$multiarch/lua/5.4/luapool.so" "$moved/share/lua/5.4" "$moved/bin/luapool")" "$out"
cpu_run "$moved/bin/luapool"
pass "cmake --install --prefix, moved: stock lua5.4 runs both pools, workers from the moved bin/luapool"

# 4. The Debian package.
(cd "$build" && cpack -G DEB) >"$work/cpack.log" 2>&1 || { cat "$work/cpack.log" >&2; fail "cpack -G DEB"; }
deb=$build/luapool_${version}-1_amd64.deb
[[ -f $deb ]] || fail "cpack -G DEB made no $deb"
files=$(dpkg-deb -c "$deb" | awk '$1 !~ /^d/ { print $6 }' | sort)
deb_mpi="" # a build with MPI ships its plugin, linked with Open MPI
[[ -e $build/luapool-mpi.so ]] && deb_mpi=/usr/lib/$multiarch/luapool/luapool-mpi.so
expected_files=$( (cat <<EOF
./usr/bin/luapool
./usr/lib/$multiarch/lua/5.4/luapool.so
./usr/share/doc/luapool/README.md
./usr/share/man/man1/luapool.1
EOF
  [[ -z $deb_mpi ]] || echo ".$deb_mpi"
  git ls-files 'docs/*.md' 'docs/*.svg' | sed 's|^|./usr/share/doc/luapool/|'
  plain_lua | sed 's|^lua/|./usr/share/lua/5.4/|') | sort)
same "dpkg-deb -c (files)" "$expected_files" "$files"
same "Package" "luapool" "$(dpkg-deb -f "$deb" Package)"
same "Version" "$version-1" "$(dpkg-deb -f "$deb" Version)"
# (each output taken whole before grep -q reads it: grep leaves at its first
# match, and under pipefail the writer's SIGPIPE made the test false: a
# plugin whose libmpi ldd lists second read as one without it, once in CI)
readline=""  # a host built with readline (its --help says so): its REPL loads it
host_help=$("$build/luapool" --help)
grep -q "(with readline)" <<<"$host_help" && readline=", libreadline8"
mpi=""  # the MPI plugin (mpipool) needs Open MPI's runtime; the host links none
host_libs=$(ldd "$build/luapool")
grep -q 'libmpi\.so' <<<"$host_libs" && fail "$build/luapool links libmpi (the MPI plugin should)"
grep -q 'libreadline' <<<"$host_libs" && fail "$build/luapool links libreadline (its REPL should load it)"
[[ -z $deb_mpi ]] || { grep -q 'libmpi\.so' <<<"$(ldd "$build/luapool-mpi.so")" && mpi=", libopenmpi3"; }
# what every run needs is Depends; what one feature loads (the REPL's line
# editing, --mpi) is Recommends
same "Depends" "libc6, liblua5.4-0, libcurl4" "$(dpkg-deb -f "$deb" Depends)"
same "Recommends" "lua5.4$readline$mpi" "$(dpkg-deb -f "$deb" Recommends)"
same "Architecture" "amd64" "$(dpkg-deb -f "$deb" Architecture)"
dpkg-deb -I "$deb" >/dev/null
pass "cpack -G DEB: $(basename "$deb"), its files, Depends and Recommends"

if dpkg-query -W -f='${Status}' luapool 2>/dev/null | grep -q "ok installed"; then
  fail "a luapool package is installed already: not touching it"
fi
while read -r f; do
  [[ ! -e ${f#.} ]] || fail "${f#.} exists already (another install?): not overwriting it"
done <<<"$files"
installed=1
dpkg_locked -i "$deb" >/dev/null || fail "dpkg -i $deb"
same "dpkg -L luapool (files)" "${expected_files//.\/usr//usr}" \
  "$(dpkg -L luapool | while read -r f; do [[ -d $f ]] || echo "$f"; done | sort)"
cpu_run /usr/bin/luapool
out=$(cd "$work" && env -u LUA_PATH -u LUA_CPATH -u LUA_PATH_5_4 -u LUA_CPATH_5_4 -u LUAPOOL_WORKER_EXE \
  lua5.4 smoke.lua 2>&1) || fail "lua5.4 smoke.lua after dpkg -i: $out"
same "lua5.4 smoke.lua (Debian package)" \
  "$(smoke_expected "/usr/lib/$multiarch/lua/5.4/luapool.so" /usr/share/lua/5.4 /usr/bin/luapool)" "$out"
same "man -w luapool" "/usr/share/man/man1/luapool.1" "$(man -w luapool)"
[[ -z $deb_mpi ]] || mpi_run /usr/bin/luapool "$deb_mpi"
pass "dpkg -i: /usr/bin/luapool runs scripts/cpu.lua${deb_mpi:+ and --mpi}, stock lua5.4 runs both pools, man luapool"

dpkg_locked -r luapool >/dev/null || fail "dpkg -r luapool"
installed=0
while read -r f; do
  [[ ! -e ${f#.} ]] || fail "dpkg -r left ${f#.}"
done <<<"$files"
for d in /usr/share/lua/5.4/luapool /usr/share/doc/luapool; do
  [[ ! -e $d ]] || fail "dpkg -r left $d"
done
if dpkg-query -W -f='${Status}' luapool 2>/dev/null | grep -q "ok installed"; then fail "dpkg -r: still installed"; fi
pass "dpkg -r luapool removes every file"

echo "package-check: $passed passed, 0 failed"
