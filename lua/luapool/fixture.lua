-- luapool.fixture: a throwaway nginx on 127.0.0.1 for specs, benchmarks
-- and demos, with controllable latency (/sleep) and body sizes (/bytes).
--
--   local srv <close> = assert(fixture.start{ workers = 2 })
--   srv:url("/bytes?n=1000")   --> "http://127.0.0.1:PORT/bytes?n=1000"
--
-- Endpoints (nginx + the echo module; every query argument optional):
--   /                          200 "luapool fixture\n"
--   /sleep?s=T                 waits T seconds, then "ok\n"
--   /bytes?n=N                 N bytes "x"
--   /drop                      closes the connection without an answer
--   /redirect                  302 to /bytes?n=10
--   /status/CODE?retry_after=V that status (codes: STATUS_CODES), with a
--                              Retry-After: V header when V is given (V = now:
--                              the current time as an HTTP-date)
--   /echo                      the request body as the response body, any
--                              method; X-Method: the request's method
--   /headers                   the request's header block, as received
--   /respheader?value=V        200 "ok\n" with X-Fixture: V
--   /flaky?key=K&fail=N&retry_after=V
--                              503 (Retry-After: V if given) for the first N
--                              requests (1..5, default 1) with key K, then
--                              200 "ok\n" (for about a minute: a fresh key
--                              per test).  The count is nginx's limit_req
--                              zone, keyed by K, shared by the workers.
--   /slowbody?chunks=N&s=T     N (1..20, default 3) lines "chunk I\n", each
--                              flushed, T seconds apart
--   /close                     200 "ok\n" with Connection: close (the server
--                              closes the connection after the answer)
--   /shortkeep                 200 "ok\n"; the server closes the kept-alive
--                              connection after 1 s idle (keepalive_timeout 1s)
--   /length?n=N                1 or 10 bytes "x" (n=1, n=10; else 100), with
--                              a Content-Length (the echo module's answers
--                              are chunked)
--   /nginx_status              stub_status: "Active connections: ...",
--                              "Reading: R Writing: W Waiting: K"
--
-- It serves 10,000 connections at once: worker_connections (opts.connections,
-- default 16384 per worker), a listen backlog as large (the kernel caps it
-- at net.core.somaxconn) and worker_rlimit_nofile raised to match, within
-- the hard RLIMIT_NOFILE of the shell that starts it (`ulimit -Hn`).
--
-- It does not outlive the process that started it: a watchdog (a detached
-- shell loop) stops nginx and removes its directory within about a second
-- of that process's end, however it ended (a spec killed by ctest's timeout,
-- kill -9), when stop() did not run.
--
-- Plain Lua 5.4 (io/os/string/table only) so it runs both under stock
-- lua5.4/busted and inside the luapool host: processes are driven through
-- the shell and readiness is read from /proc.
local M = {}

local NGINX = "/usr/sbin/nginx"
local ECHO_MODULE = "/usr/lib/nginx/modules/ngx_http_echo_module.so"
local TIMEOUT = 5          -- seconds, for both startup and shutdown waits
local POLL = 0.05          -- seconds between polls
local PORT_TRIES = 20

-- Codes served at /status/NNN (nginx's `return` needs a literal code, so
-- each gets its own location); any other /status/* path is a 404.
local STATUS_CODES = { 200, 201, 204, 304, 400, 401, 403, 404, 408, 409, 410, 429,
                       500, 502, 503, 504 }

local function q(s) -- shell-quote one argument
  return "'" .. tostring(s):gsub("'", [['\'']]) .. "'"
end

local function sh(cmd) -- run quietly, true on exit status 0
  return os.execute(cmd .. " >/dev/null 2>&1") == true
end

local function capture(cmd)
  local p = io.popen(cmd, "r")
  if not p then return "" end
  local out = p:read("a") or ""
  p:close()
  return out
end

local function readfile(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s
end

local function sleep(s) os.execute("sleep " .. s) end

local function exists(path)
  local f = io.open(path, "rb")
  if f then f:close() return true end
  return false
end

-- Alive and not a zombie: PID 1 in containers does not always reap, so an
-- exited daemon can linger in /proc as state Z.
local function alive(pid)
  local stat = readfile("/proc/" .. pid .. "/stat")
  if not stat then return false end
  local state = stat:match("%)%s+(%a)")
  return state ~= nil and state ~= "Z" and state ~= "X"
end

-- Set of TCP ports in LISTEN state (st 0A), from /proc/net/tcp{,6}.
local function listening_ports()
  local set = {}
  for _, file in ipairs{ "/proc/net/tcp", "/proc/net/tcp6" } do
    for line in (readfile(file) or ""):gmatch("[^\n]+") do
      local port, st = line:match("^%s*%d+:%s+%x+:(%x+)%s+%x+:%x+%s+(%x+)")
      if port and st == "0A" then set[tonumber(port, 16)] = true end
    end
  end
  return set
end

local function wait_until(pred)
  local deadline = os.time() + TIMEOUT -- whole seconds: bound is 5..6 s
  repeat
    if pred() then return true end
    sleep(POLL)
  until os.time() > deadline
  return pred()
end

-- Keep only nginx's real complaints ([emerg]/[alert]/[crit]), deduplicated:
-- a failed bind() is otherwise repeated five times.
local function summarize(text)
  local seen, lines = {}, {}
  for line in (text or ""):gmatch("[^\n]+") do
    if line:find("%[emerg%]") or line:find("%[alert%]") or line:find("%[crit%]") then
      line = line:gsub("^nginx: ", "")
      if not seen[line] then seen[line] = true; lines[#lines + 1] = line end
    end
  end
  if #lines == 0 then return (text or ""):match("^%s*(.-)%s*$") end
  return table.concat(lines, "; ")
end

local CONFIG = [[
# generated by luapool.fixture; removed on stop
load_module "@MODULE@";
@USER@
daemon on;
worker_processes @WORKERS@;
pid "@DIR@/nginx.pid";
error_log "@DIR@/error.log";
worker_rlimit_nofile @NOFILE@;
events { worker_connections @CONNECTIONS@; multi_accept on; }
http {
  access_log off;
  default_type text/plain;
  client_body_temp_path "@DIR@/client_body";
  proxy_temp_path "@DIR@/proxy";
  fastcgi_temp_path "@DIR@/fastcgi";
  uwsgi_temp_path "@DIR@/uwsgi";
  scgi_temp_path "@DIR@/scgi";
  keepalive_requests 100000;
  keepalive_timeout 60s;
  # echo_sleep/echo_duplicate reject an empty argument: default to 0
  map $arg_s $fixture_s { "" 0; default $arg_s; }
  map $arg_n $fixture_n { "" 0; default $arg_n; }
  map $arg_fail $fixture_fail { "" 1; default $arg_fail; }
  map $arg_chunks $fixture_chunks { "" 3; default $arg_chunks; }
  # /length: a fixed body (return sets its Content-Length)
  map $arg_n $fixture_x { "" ""; "1" "x"; "10" "xxxxxxxxxx"; default "@HUNDRED@"; }
  # retry_after=now: an HTTP-date (RFC 850 form, $date_gmt of the ssi module)
  map $arg_retry_after $fixture_retry_after { "now" $date_gmt; default $arg_retry_after; }
  # /flaky's memory: requests per key (1 a minute pass, a burst more)
  limit_req_zone $arg_key zone=flaky:1m rate=1r/m;
  limit_req_status 429;
  limit_req_log_level info;
  # /echo: the body must stay in memory to be echoed
  client_body_buffer_size 1m;
  client_max_body_size 1m;
  server {
    listen 127.0.0.1:@PORT@ backlog=@CONNECTIONS@;
    location = / { return 200 "luapool fixture\n"; }
    location = /sleep { echo_sleep $fixture_s; echo "ok"; }
    location = /bytes { echo_duplicate $fixture_n "x"; }
    location = /drop { return 444; }
    location = /redirect { return 302 /bytes?n=10; }
    location = /echo {
      add_header X-Method $request_method;
      echo_read_request_body;
      echo -n $request_body;
    }
    location = /headers { echo -n $echo_client_request_headers; }
    location = /respheader { add_header X-Fixture $arg_value; echo "ok"; }
    location = /nginx_status { stub_status; }
    location = /close { keepalive_timeout 0; echo "ok"; }
    location = /shortkeep { keepalive_timeout 1s; echo "ok"; }
    location = /length { default_type text/plain; return 200 $fixture_x; }
    # the arguments stay (no "?" in the target): key, retry_after, s
    location = /flaky { rewrite ^ /flaky_$fixture_fail last; }
    location = /slowbody { rewrite ^ /slowbody_$fixture_chunks last; }
    # a limit_req rejection (the (N+1)th request of a key) is the success
    location @flaky_ok { echo "ok"; }
@STATUS@
@FLAKY@
@SLOWBODY@
    # never touch the filesystem (no root): unknown paths are plain 404s
    location / { return 404; }
  }
}
]]

local function config(dir, port, workers, root, connections, nofile)
  local status, flaky, slow = {}, {}, {}
  for _, code in ipairs(STATUS_CODES) do
    -- (add_header skips an empty value: no Retry-After unless asked;
    -- `return 408` would close the connection without an answer)
    local answer = code == 408 and 'echo_status 408; echo "request timeout";'
      or ("return %d;"):format(code)
    status[#status + 1] = ("    location = /status/%d { add_header Retry-After $fixture_retry_after"
      .. " always; %s }"):format(code, answer)
  end
  for n = 1, 5 do
    -- limit_req runs before the content phase: N requests pass it and get
    -- the 503 (echo_status, not return, which would run before it)
    -- (burst=0 is refused: no burst argument at all means none)
    local burst = n > 1 and (" burst=%d nodelay"):format(n - 1) or ""
    flaky[#flaky + 1] = ("    location = /flaky_%d { internal; limit_req zone=flaky%s;"
      .. " error_page 429 = @flaky_ok; add_header Retry-After $fixture_retry_after always;"
      .. " echo_status 503; echo \"unavailable\"; }"):format(n, burst)
  end
  for n = 1, 20 do
    local body = {}
    for i = 1, n do
      if i > 1 then body[#body + 1] = "echo_sleep $fixture_s;" end
      body[#body + 1] = ("echo \"chunk %d\"; echo_flush;"):format(i)
    end
    slow[#slow + 1] = ("    location = /slowbody_%d { internal; %s }"):format(n, table.concat(body, " "))
  end
  local vars = {
    MODULE = ECHO_MODULE, DIR = dir, PORT = tostring(port), HUNDRED = ("x"):rep(100),
    WORKERS = tostring(workers), STATUS = table.concat(status, "\n"),
    FLAKY = table.concat(flaky, "\n"), SLOWBODY = table.concat(slow, "\n"),
    CONNECTIONS = tostring(connections), NOFILE = tostring(nofile),
    -- as root, workers would drop to `nobody` (unable to use DIR); as
    -- non-root the directive only earns a warning, so emit it for root only
    USER = root and "user root;" or "",
  }
  return (CONFIG:gsub("@(%u+)@", vars))
end

-- A process's start time (field 22 of /proc/PID/stat), or nil when it is
-- gone or a zombie: with the pid it names one process, never a later one
-- that reused the pid.
local function start_time(pid)
  local stat = readfile("/proc/" .. pid .. "/stat")
  local rest = stat and stat:match("^%d+ %b() (.*)$")
  if not rest or rest:match("^[ZX]") then return nil end
  local fields = {}
  for w in rest:gmatch("%S+") do fields[#fields + 1] = w end
  return fields[20] -- (field 22 counts pid and comm)
end

-- The watchdog: a bash reading a pipe whose other end the owner holds
-- (io.popen's).  EOF comes when the owner is gone (or closes it), unless a
-- child of the owner that inherited the pipe lives on: so each second
-- (read's timeout) it also looks whether the owner is still the process it
-- was.  Only builtins run while it waits (no process a second: a traced
-- run, valgrind's, is not slowed).  When the owner is gone it stops nginx if
-- that is still the process it was (TERM, then KILL for the master and its
-- workers after 5 s) and removes the directory.  setsid and an orphan: out
-- of the owner's process group and process tree, so that a kill of either
-- (ctest's timeout kills a test's descendants) leaves it to do its job.
-- (stop() stops nginx first, then closes the pipe: nothing left to do.)
local WATCHDOG = [=[
started() { local s=; read -r s < /proc/$1/stat 2>/dev/null; s=${s##*) }; set -- $s
  case $1 in Z|X|"") ;; *) echo "${20}" ;; esac; }
while :; do
  read -r -t 1 _; rc=$?
  [ $rc -eq 0 ] && continue
  [ $rc -gt 128 ] && [ "$(started "$1")" = "$2" ] && continue
  break
done
[ "$(started "$3")" = "$4" ] || exit 0
kill -TERM "$3"
i=0; while [ $i -lt 50 ] && [ "$(started "$3")" = "$4" ]; do sleep 0.1; i=$((i+1)); done
[ "$(started "$3")" = "$4" ] && { pkill -KILL -P "$3"; kill -KILL "$3"; }
rm -rf "$5"
]=]

local function watch(nginx, dir)
  local owner = tonumber((readfile("/proc/self/stat") or ""):match("^(%d+)"))
  local os_, ns = owner and start_time(owner), start_time(nginx)
  if not os_ or not ns or not exists("/bin/bash") then return nil end
  local setsid = exists("/usr/bin/setsid") and "/usr/bin/setsid " or ""
  -- (in the background of a shell that exits at once: an orphan, not a
  -- descendant of the owner, which a test runner's timeout kills with it;
  -- its stdin the pipe, through fd 3: a background job's would be /dev/null)
  return io.popen(("exec 3<&0; (%s/bin/bash -c %s fixture-watchdog %d %s %d %s %s <&3 3<&- >/dev/null 2>&1 &)"):format(
    setsid, q(WATCHDOG), owner, os_, nginx, ns, q(dir)), "w")
end

local Server = {}
Server.__index = Server

function Server:url(path)
  assert(type(path) == "string" and path:sub(1, 1) == "/",
         "fixture: url path must start with '/'")
  return self.base .. path
end

-- Idempotent; also safe on a half-started server (no pid file, no dir).
function Server:stop()
  if self.stopped then return end
  self.stopped = true
  local pid = self.dir and tonumber((readfile(self.dir .. "/nginx.pid") or ""):match("%d+"))
  if pid and alive(pid) then
    sh("kill -TERM " .. pid)
    if not wait_until(function() return not alive(pid) end) then
      -- kill the workers first: once the master is gone they are orphans
      sh("pkill -KILL -P " .. pid)
      sh("kill -KILL " .. pid)
      wait_until(function() return not alive(pid) end)
    end
  end
  if self.dir then sh("rm -rf " .. q(self.dir)) end
  if self.watchdog then self.watchdog:close() end
end

Server.__close = Server.stop
Server.__gc = Server.stop

function M.available()
  if not exists(NGINX) then
    return false, "fixture: nginx not found at " .. NGINX
      .. " (apt-get install nginx libnginx-mod-http-echo)"
  end
  if not exists(ECHO_MODULE) then
    return false, "fixture: nginx echo module not found at " .. ECHO_MODULE
      .. " (apt-get install libnginx-mod-http-echo)"
  end
  return true
end

-- Returns a started server, or nil and a message; never raises for
-- failures of the environment (missing nginx, busy ports, ...).
function M.start(opts)
  opts = opts or {}
  local ok, why = M.available()
  if not ok then return nil, why end
  local workers = math.tointeger(opts.workers or 2)
  if not workers or workers < 1 then return nil, "fixture: workers must be a positive integer" end
  if opts.port ~= nil and not math.tointeger(opts.port) then return nil, "fixture: port must be an integer" end
  local connections = math.tointeger(opts.connections or 16384)
  if not connections or connections < 16 then
    return nil, "fixture: connections must be an integer >= 16"
  end
  -- Each connection is a descriptor, plus nginx's own: ask for that much,
  -- but never more than the hard limit (nginx, unprivileged, could not
  -- raise it and would only warn).
  local nofile = connections + 1024
  local hard = capture("ulimit -Hn 2>/dev/null"):match("^%s*(%d+)%s*$")
  if hard and tonumber(hard) < nofile then nofile = tonumber(hard) end

  local dir = capture("mktemp -d /tmp/luapool-fixture.XXXXXX 2>/dev/null"):match("^%s*(.-)%s*$")
  if dir == "" then return nil, "fixture: mktemp -d failed" end
  local srv = setmetatable({ dir = dir }, Server)
  local root = capture("id -u"):match("^%s*0%s*$") ~= nil
  local conf, startlog = dir .. "/nginx.conf", dir .. "/start.log"

  for _ = 1, opts.port and 1 or PORT_TRIES do
    local port = math.tointeger(opts.port)
    if not port then -- random, skipping ports already listening
      local busy = listening_ports()
      repeat port = math.random(20000, 60999) until not busy[port]
    end
    local f = io.open(conf, "w")
    if not f then srv:stop() return nil, "fixture: cannot write " .. conf end
    f:write(config(dir, port, workers, root, connections, nofile))
    f:close()
    os.remove(dir .. "/error.log") -- so a failure reports only this attempt
    -- -e: the startup log would otherwise be /var/log/nginx/error.log.
    -- stderr goes to a file, not a pipe: nothing to inherit or block on.
    local started = os.execute(("%s -p %s -c %s -e %s >%s 2>&1 </dev/null"):format(
      q(NGINX), q(dir .. "/"), q(conf), q(dir .. "/error.log"), q(startlog))) == true
    local log = readfile(startlog) or ""
    if started then
      srv.port, srv.base = port, "http://127.0.0.1:" .. port
      local pidfile = dir .. "/nginx.pid"
      -- the watchdog as soon as nginx has a pid, before waiting for it to
      -- listen: an owner that dies meanwhile must not leave it behind
      if wait_until(function() return exists(pidfile) end) then
        srv.pid = tonumber((readfile(pidfile) or ""):match("%d+"))
        srv.watchdog = srv.pid and watch(srv.pid, dir)
      end
      if srv.pid and wait_until(function() return listening_ports()[port] end) then return srv end
      local msg = summarize(log .. (readfile(dir .. "/error.log") or ""))
      srv:stop()
      return nil, "fixture: nginx started but is not listening on port " .. port
        .. (msg ~= "" and (": " .. msg) or "")
    end
    -- a lost race for the port is retried; anything else is fatal
    if opts.port or not log:find("Address already in use", 1, true) then
      srv:stop()
      return nil, "fixture: nginx failed to start: " .. summarize(log)
    end
  end
  srv:stop()
  return nil, "fixture: nginx failed to start: no free port after " .. PORT_TRIES .. " tries"
end

return M
