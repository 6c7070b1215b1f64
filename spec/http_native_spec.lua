-- The native HTTP/1.1 transport (src/kernels/hnative.c) against libcurl's
-- (LUAPOOL_HTTP=curl): the same requests, as scripts run once per
-- transport, give the same results and messages; keep-alive, connections
-- the server closes, and which requests go native.
local h = require "helper"

-- Prints one line per request: what a caller sees (the port and times,
-- which differ from run to run, replaced).
local SCRIPT = [[
local luapool = require "luapool"
local base = ...
local port = base:match(":(%d+)$")
local function show(name, o)
  local r, e = luapool.http.request(o)
  local line
  if r then
    local hs = {}
    for _, k in ipairs { "content-length", "transfer-encoding", "connection", "location",
                         "x-method", "retry-after" } do
      if r.headers[k] then hs[#hs + 1] = k .. "=" .. r.headers[k] end
    end
    -- (native asks for identity, by design: it never decodes; libcurl lists its decoders)
    local body = name == "headers" and r.body:gsub("Accept%-Encoding: [^\r\n]*\r\n", "") or r.body
    body = #body > 200 and ("#" .. #body) or body:gsub("[\r\n]", { ["\r"] = "\\r", ["\n"] = "\\n" })
    line = ('%d "%s" %s attempts=%d %s'):format(r.status, body,
      r.url, r.attempts, table.concat(hs, ","))
  else
    line = "error " .. e
  end
  line = line:gsub(port, "PORT"):gsub("%d+ ms", "N ms"):gsub("%d+ milliseconds", "N milliseconds")
  print(name .. ": " .. line)
end
show("root", { url = base .. "/" })
show("chunked", { url = base .. "/bytes?n=100000" })
show("empty", { url = base .. "/bytes?n=0" })
show("length", { url = base .. "/length?n=10" })
show("head", { url = base .. "/length?n=10", method = "HEAD" })
show("redirect", { url = base .. "/redirect" })
show("redirect, not followed", { url = base .. "/redirect", follow = false })
show("redirect, none left", { url = base .. "/redirect", follow = 0 })
show("204", { url = base .. "/status/204" })
show("304", { url = base .. "/status/304" })
show("503", { url = base .. "/status/503?retry_after=0", retries = 1 })
show("close", { url = base .. "/close" })
show("after close", { url = base .. "/length?n=1" })
show("post", { url = base .. "/echo", method = "POST", body = "a=1", follow = false })
show("put", { url = base .. "/echo", method = "PUT", body = "x", follow = 0 })
show("delete", { url = base .. "/echo", method = "DELETE", follow = false })
show("slow body", { url = base .. "/slowbody?chunks=3&s=0.05" })
show("drop", { url = base .. "/drop" })
show("refused", { url = "http://127.0.0.1:1/" })
show("refused v6", { url = "http://[::1]:1/" })
show("timeout", { url = base .. "/sleep?s=3", timeout = 0.3 })
show("headers", { url = base .. "/headers", headers = { ["X-A"] = "1" } })
-- which transport answered (stderr): libcurl asks for its encodings
local r = assert(luapool.http.request { url = base .. "/headers" })
io.stderr:write(r.body:find("Accept-Encoding: identity\r\n", 1, true) and "native" or "curl")
]]

local function run(mode)
  local srv = h.fixture()
  local path = h.tempfile(SCRIPT)
  local out, err, code = h.run({ path, srv.base }, nil, { LUAPOOL_HTTP = mode })
  os.remove(path)
  srv:stop()
  assert.are.equal(0, code, err)
  assert.are.equal(mode, err)
  return out
end

describe("the native HTTP transport", function()
  it("answers as libcurl does: results, headers, urls, attempts, messages", function()
    local native, curl = run("native"), run("curl")
    assert.are.equal(curl, native)
    local want = {
      'root: 200 "luapool fixture\\n" BASE/ attempts=1 content-length=16',
      'chunked: 200 "#100000" BASE/bytes?n=100000 attempts=1 transfer-encoding=chunked',
      'length: 200 "xxxxxxxxxx" BASE/length?n=10 attempts=1 content-length=10',
      'head: 200 "" BASE/length?n=10 attempts=1 content-length=10',
      'redirect: 200 "xxxxxxxxxx" BASE/bytes?n=10 attempts=1 transfer-encoding=chunked',
      'redirect, not followed: 302 "<html>\\r\\n<head><title>302 Found',
      'headers: 200 "GET /headers HTTP/1.1\\r\\nHost: 127.0.0.1:PORT\\r\\nUser-Agent: luapool/0.1' ..
        '\\r\\nAccept: */*\\r\\nX-A: 1\\r\\n\\r\\n"',
      '204: 204 "" BASE/status/204 attempts=1',
      '304: 304 "" BASE/status/304 attempts=1',
      '503: 503',
      'close: 200 "ok\\n" BASE/close attempts=1 transfer-encoding=chunked,connection=close',
      'post: 200 "a=1" BASE/echo attempts=1',
      'slow body: 200 "chunk 1\\nchunk 2\\nchunk 3\\n"',
      "drop: error GET BASE/drop: Server returned nothing (no headers, no data) " ..
        "(Empty reply from server)",
      "refused: error GET http://127.0.0.1:1/: Couldn't connect to server (Failed to connect " ..
        "to 127.0.0.1 port 1 after N ms: Couldn't connect to server)",
      "refused v6: error GET http://[::1]:1/: Couldn't connect to server (Failed to connect " ..
        "to ::1 port 1 after N ms: Couldn't connect to server)",
      "timeout: error GET BASE/sleep?s=3: Timeout was reached (Operation timed out after " ..
        "N milliseconds with 0 bytes received)",
    }
    local base = "http://127.0.0.1:PORT"
    for _, w in ipairs(want) do
      w = w:gsub("BASE", base)
      assert.is_truthy(native:find(w, 1, true), w .. "\nin:\n" .. native)
    end
  end)

  it("keeps connections alive: one connection for requests one after the other", function()
    local srv = h.fixture()
    local path = h.tempfile([[
      local luapool = require "luapool"
      local base = ...
      local function accepts()
        local r = assert(luapool.http.request { url = base .. "/nginx_status" })
        return tonumber(r.body:match("\n%s*(%d+)"))
      end
      local a = accepts()
      for i = 1, 20 do assert(luapool.http.request { url = base .. "/length?n=" .. i }) end
      -- a kept-alive connection the server closes after 1 s idle: the next
      -- request still answers, in one attempt
      assert(luapool.http.request { url = base .. "/shortkeep" })
      luapool.sleep(1.5)
      local r = assert(luapool.http.request { url = base .. "/shortkeep" })
      print(accepts() - a, r.status, r.attempts)
    ]])
    local out, err, code = h.run({ path, srv.base })
    os.remove(path)
    srv:stop()
    assert.are.equal(0, code, err)
    -- 0 new connections for the 21 requests, then 1 after the server's close
    assert.are.equal("1\t200\t1\n", out)
  end)

  -- TIME_WAIT sockets of the fixture's port, from /proc/net/tcp{,6} (state 06)
  local function time_wait(port)
    local n, hex = 0, (":%04X"):format(port)
    for _, f in ipairs { "/proc/net/tcp", "/proc/net/tcp6" } do
      local fh = io.open(f)
      for line in fh and fh:lines() or function() end do
        local la, ra, st = line:match("^%s*%d+: (%S+) (%S+) (%x%x)")
        if st == "06" and (la:sub(-5) == hex or ra:sub(-5) == hex) then n = n + 1 end
      end
      if fh then fh:close() end
    end
    return n
  end

  for _, mode in ipairs { "native", "curl" } do
    it("leaves no port in TIME_WAIT: a closing loop resets its kept-alive connections (" .. mode .. ")", function()
      local srv = h.fixture()
      local port = tonumber(srv.base:match(":(%d+)$"))
      local path = h.tempfile([[
        local luapool = require "luapool"
        local base = ...
        -- blocking requests in the main script (its thread's loop closes at exit)
        for i = 1, 3 do assert(luapool.http.request { url = base .. "/length?n=" .. i }) end
        -- and 20 at once on an iopool, closed
        local pool <close> = luapool.iopool.new { concurrency = 20 }
        local urls = {}
        for i = 1, 20 do urls[i] = base .. "/sleep?s=0.1&i=" .. i end
        assert(#pool:map(luapool.kernels.fetch_length, urls) == 20)
      ]])
      local before = time_wait(port)
      local _, err, code = h.run({ path, srv.base }, nil, { LUAPOOL_HTTP = mode == "curl" and "curl" or nil })
      os.remove(path)
      local after = time_wait(port)
      srv:stop()
      assert.are.equal(0, code, err)
      assert.are.same({ 0, 0 }, { before, after })
    end)
  end
end)
