#!/usr/bin/env bash
# Installs the Debian packages luapool needs, configures and builds it in
# build/, then runs the offline demo of both reference jobs.
#   scripts/setup.sh            install, build, demo
#   scripts/setup.sh --no-demo  install and build only (CI)
#   scripts/setup.sh --peers    also the benchmarks' peers (scripts/bench/peers.lua,
#                               mpi.lua): Python's aiohttp and mpi4py for
#                               /usr/bin/python3, luv for lua5.4, curl, wrk
# Extra CMake arguments come from $CMAKE_ARGS (CI sets -DLUAPOOL_WERROR=ON).
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(build-essential cmake pkg-config liblua5.4-dev lua5.4
          libcurl4-openssl-dev ca-certificates lua-busted
          nginx libnginx-mod-http-echo
          luarocks groff-base man-db libreadline-dev tmux
          openmpi-bin libopenmpi-dev)
demo=1
for arg in "$@"; do
  case $arg in
    --no-demo) demo=0 ;;
    --peers) packages+=(python3 python3-aiohttp python3-mpi4py lua-luv curl wrk) ;;
    *) echo "setup: unknown option $arg (see the head of scripts/setup.sh)" >&2; exit 2 ;;
  esac
done
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""
  [[ $(id -u) -eq 0 ]] || sudo="sudo"
  echo "setup: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# shellcheck disable=SC2086
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo ${CMAKE_ARGS:-}
cmake --build build -j"$(nproc)"

if ((demo)); then
  build/luapool scripts/demo.lua
fi
