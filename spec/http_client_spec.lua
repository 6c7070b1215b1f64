-- luapool.http.request against the nginx fixture: methods, bodies, headers,
-- redirects, retries (curl's --retry rules, backoff, Retry-After), timings,
-- option errors, stops, running out of descriptors.
local luapool = require "luapool"
local h = require "helper"

local request = luapool.http.request
local q = h.shell_quote

-- A key /flaky has never seen (its counts live about a minute).
local keyn = 0
local function key()
  keyn = keyn + 1
  return ("k%d-%d-%d"):format(os.time(), math.random(1, 1e9), keyn)
end

describe("http.request", function()
  local srv
  setup(function() srv = h.fixture() end)
  teardown(function() if srv then srv:stop() end end)

  it("returns status, lower-cased headers, body, final url, attempts and timings", function()
    local r = assert(request { url = srv:url("/respheader?value=abc") })
    assert.are.equal(200, r.status)
    assert.are.equal("ok\n", r.body)
    assert.are.equal("abc", r.headers["x-fixture"])
    assert.is_nil(r.headers["X-Fixture"])
    assert.are.equal(srv:url("/respheader?value=abc"), r.url)
    assert.are.equal(1, r.attempts)
    for _, k in ipairs { "dns", "connect", "tls", "ttfb", "total" } do
      assert.are.equal("number", type(r.timings[k]), k)
      assert.is_true(r.timings[k] >= 0, k)
    end
    assert.is_true(r.timings.total >= r.timings.ttfb)
    local slow = assert(request { url = srv:url("/sleep?s=0.2") })
    assert.is_true(slow.timings.ttfb >= 0.15, ("ttfb %.3f"):format(slow.timings.ttfb))
    assert.is_true(slow.timings.total >= 0.15, ("total %.3f"):format(slow.timings.total))
  end)

  it("sends any method, a body and headers", function()
    local r = assert(request { url = srv:url("/echo"), method = "POST", body = "hello\0world" })
    assert.are.same({ 200, "POST", "hello\0world" }, { r.status, r.headers["x-method"], r.body })
    for _, m in ipairs { "PUT", "PATCH", "DELETE", "OPTIONS", "GET" } do
      r = assert(request { url = srv:url("/echo"), method = m, body = m .. " body" })
      assert.are.same({ 200, m, m .. " body" }, { r.status, r.headers["x-method"], r.body })
    end
    r = assert(request { url = srv:url("/echo"), method = "HEAD" })
    assert.are.same({ 200, "HEAD", "" }, { r.status, r.headers["x-method"], r.body })
    r = assert(request { url = srv:url("/headers"),
                         headers = { ["X-One"] = "1", "X-Two: two", ["X-Num"] = 3 } })
    assert.matches("\r\nX%-One: 1\r\n", r.body)
    assert.matches("\r\nX%-Two: two\r\n", r.body)
    assert.matches("\r\nX%-Num: 3\r\n", r.body)
    assert.matches("^GET /headers HTTP/1%.1\r\n", r.body)
  end)

  it("sends each request as asked on a handle and connection the one before used", function()
    -- one after the other on this thread's loop: the easy handle of a plain
    -- GET is kept with its options set; another request must not inherit them
    local function hdrs(opts)
      opts.url = srv:url("/headers")
      local r = assert(request(opts))
      return r.status, r.body
    end
    local st, b = hdrs { method = "POST", body = "abc", headers = { ["X-A"] = "1" } }
    assert.are.equal(200, st)
    assert.matches("^POST /headers HTTP/1%.1\r\n", b)
    assert.matches("\r\nX%-A: 1\r\n", b)
    assert.matches("\r\nContent%-Length: 3\r\n", b)
    for _ = 1, 2 do
      st, b = hdrs {}
      assert.are.equal(200, st)
      assert.matches("^GET /headers HTTP/1%.1\r\n", b)
      assert.is_nil(b:find("X-A", 1, true))
      assert.is_nil(b:find("Content-Length", 1, true))
    end
    st, b = hdrs { headers = { ["X-B"] = "2" } }
    assert.are.equal(200, st)
    assert.matches("\r\nX%-B: 2\r\n", b)
    st, b = hdrs { connect_timeout = 3 }
    assert.are.equal(200, st)
    assert.matches("^GET /headers HTTP/1%.1\r\n", b)
    assert.is_nil(b:find("X-B", 1, true))
    assert.are.equal(200, (assert(request { url = srv:url("/headers"), method = "HEAD" })).status)
    st, b = hdrs {}
    assert.are.equal(200, st)
    assert.matches("^GET /headers HTTP/1%.1\r\n", b)
    -- a plain GET that follows no redirect, then one that does
    assert.are.equal(302, (assert(request { url = srv:url("/redirect"), follow = false })).status)
    local r = assert(request { url = srv:url("/redirect") })
    assert.are.same({ 200, "xxxxxxxxxx" }, { r.status, r.body })
    assert.are.equal(302, (assert(request { url = srv:url("/redirect"), follow = false })).status)
  end)

  it("follows redirects unless told not to", function()
    local r = assert(request { url = srv:url("/redirect") })
    assert.are.same({ 200, "xxxxxxxxxx", srv:url("/bytes?n=10") }, { r.status, r.body, r.url })
    for _, follow in ipairs { false, 0 } do
      r = assert(request { url = srv:url("/redirect"), follow = follow })
      assert.are.same({ 302, srv:url("/bytes?n=10"), srv:url("/redirect") },
        { r.status, r.headers.location, r.url })
    end
    r = assert(request { url = srv:url("/redirect"), follow = 1 })
    assert.are.equal(200, r.status)
    local nothing, msg = request { url = srv:url("/redirect"), follow = true, method = "GET",
                                   headers = {}, timeout = 5 }
    assert.is_nil(msg)
    assert.are.equal(200, nothing.status)
  end)

  it("returns nil and a message for transport failures, as http.get", function()
    local nothing, msg = request { url = "http://127.0.0.1:1/" }
    assert.is_nil(nothing)
    assert.matches("^GET http://127%.0%.0%.1:1/: Couldn't connect to server %(", msg)
    nothing, msg = request { url = srv:url("/drop"), method = "DELETE" }
    assert.is_nil(nothing)
    assert.are.equal("DELETE " .. srv:url("/drop") ..
      ": Server returned nothing (no headers, no data) (Empty reply from server)", msg)
    local slow = srv:url("/sleep?s=3")
    local t0 = luapool.now()
    nothing, msg = request { url = slow, timeout = 0.3 }
    assert.is_nil(nothing)
    assert.matches("^GET " .. slow:gsub("%p", "%%%0") .. ": Timeout was reached %(", msg)
    assert.is_true(luapool.now() - t0 < 2.5)
    nothing, msg = request { url = "file:///etc/passwd" }
    assert.is_nil(nothing)
    assert.matches("^GET file:///etc/passwd: Unsupported protocol", msg)
  end)

  it("retries 408/429/500/502/503/504 and connection failures, with attempts counted", function()
    local r = assert(request { url = srv:url("/flaky?fail=2&key=" .. key()), retries = 3 })
    assert.are.same({ 200, "ok\n", 3 }, { r.status, r.body, r.attempts })
    r = assert(request { url = srv:url("/flaky?fail=3&key=" .. key()), retries = 1 })
    assert.are.same({ 503, "unavailable\n", 2 }, { r.status, r.body, r.attempts })
    r = assert(request { url = srv:url("/flaky?fail=1&key=" .. key()) })
    assert.are.same({ 503, 1 }, { r.status, r.attempts }) -- retries default to 0
    for _, code in ipairs { 408, 429, 500, 502, 504 } do
      r = assert(request { url = srv:url("/status/" .. code), retries = 2, retry_delay = 0 })
      assert.are.same({ code, 3 }, { r.status, r.attempts })
    end
    for _, code in ipairs { 400, 404, 410 } do
      r = assert(request { url = srv:url("/status/" .. code), retries = 2, retry_delay = 0 })
      assert.are.same({ code, 1 }, { r.status, r.attempts })
    end
    -- refused: retried, then the last failure is the answer
    local t0 = luapool.now()
    local nothing, msg = request { url = "http://127.0.0.1:1/", retries = 3, retry_delay = 0.1 }
    local took = luapool.now() - t0
    assert.is_nil(nothing)
    assert.matches("^GET http://127%.0%.0%.1:1/: Couldn't connect to server", msg)
    -- backoff 0.1, 0.2, 0.4 s, each times [0.5, 1.5): at least 0.35 s
    assert.is_true(took >= 0.3, ("took %.2f s"):format(took))
  end)

  it("retries only idempotent methods unless retry_all", function()
    for _, m in ipairs { "GET", "HEAD", "PUT", "DELETE", "OPTIONS" } do
      local r = assert(request { url = srv:url("/flaky?fail=1&key=" .. key()), method = m,
                                 retries = 1, retry_delay = 0 })
      assert.are.same({ m, 200, 2 }, { m, r.status, r.attempts })
    end
    for _, m in ipairs { "POST", "PATCH" } do
      local r = assert(request { url = srv:url("/flaky?fail=1&key=" .. key()), method = m,
                                 retries = 1, retry_delay = 0 })
      assert.are.same({ m, 503, 1 }, { m, r.status, r.attempts })
      r = assert(request { url = srv:url("/flaky?fail=1&key=" .. key()), method = m,
                           retries = 1, retry_delay = 0, retry_all = true })
      assert.are.same({ m, 200, 2 }, { m, r.status, r.attempts })
    end
  end)

  it("honours Retry-After in seconds and as an HTTP-date", function()
    local t0 = luapool.now()
    local r = assert(request { url = srv:url("/flaky?fail=1&retry_after=1&key=" .. key()),
                               retries = 1, retry_delay = 0 })
    local took = luapool.now() - t0
    assert.are.same({ 200, 2 }, { r.status, r.attempts })
    assert.is_true(took >= 0.95, ("took %.2f s"):format(took))
    assert.is_true(r.timings.total >= 0.95)
    -- an HTTP-date of now: no wait, where the backoff alone would be >= 2.5 s
    t0 = luapool.now()
    r = assert(request { url = srv:url("/flaky?fail=1&retry_after=now&key=" .. key()),
                         retries = 1, retry_delay = 5 })
    took = luapool.now() - t0
    assert.are.same({ 200, 2 }, { r.status, r.attempts })
    assert.is_true(took < 2.4, ("took %.2f s"):format(took))
  end)

  it("does not wait past its timeout: the last answer is the result", function()
    local t0 = luapool.now()
    local r = assert(request { url = srv:url("/flaky?fail=1&retry_after=30&key=" .. key()),
                               retries = 3, timeout = 2 })
    assert.are.same({ 503, 1, "30" }, { r.status, r.attempts, r.headers["retry-after"] })
    assert.is_true(luapool.now() - t0 < 1.5)
  end)

  it("refuses unknown options and bad values with the option's name", function()
    local u = srv:url("/")
    local cases = {
      { { url = u, timout = 1 }, "unknown option 'timout' to 'request'" },
      { { url = u, 5 }, "unknown option '1' to 'request'" },
      { { }, "bad option 'url' to 'request' (string expected, got nil)" },
      { { url = 5 }, "bad option 'url' to 'request' (string expected, got 5)" },
      { { url = "a\0b" }, "bad option 'url' to 'request' (URL contains a zero byte)" },
      { { url = u, timeout = -1 }, "bad option 'timeout' to 'request' (positive number expected, got -1)" },
      { { url = u, timeout = "1" }, "bad option 'timeout' to 'request' (positive number expected, got '1')" },
      { { url = u, connect_timeout = 0 },
        "bad option 'connect_timeout' to 'request' (positive number expected, got 0)" },
      { { url = u, method = "G T" },
        "bad option 'method' to 'request' (HTTP method (a token such as GET or POST) expected, got 'G T')" },
      { { url = u, method = "" },
        "bad option 'method' to 'request' (HTTP method (a token such as GET or POST) expected, got '')" },
      { { url = u, body = {} }, "bad option 'body' to 'request' (string expected, got table)" },
      { { url = u, follow = -1 },
        "bad option 'follow' to 'request' (boolean or non-negative integer expected, got -1)" },
      { { url = u, retries = 1.5 },
        "bad option 'retries' to 'request' (integer from 0 to 1000 expected, got 1.5)" },
      { { url = u, retry_delay = -1 },
        "bad option 'retry_delay' to 'request' (number of seconds from 0 to 3600 expected, got -1)" },
      { { url = u, retry_all = 1 }, "bad option 'retry_all' to 'request' (boolean expected, got 1)" },
      { { url = u, headers = "x" }, "bad option 'headers' to 'request' (table expected, got 'x')" },
      { { url = u, headers = { "X-A\r\nX-B: 1" } },
        "bad option 'headers' to 'request' (line break or zero in a header)" },
      { { url = u, headers = { "nocolon" } },
        "bad option 'headers' to 'request' ('Name: value' string expected, got 'nocolon')" },
      { { url = u, headers = { ["A:B"] = "1" } },
        "bad option 'headers' to 'request' (invalid header name 'A:B')" },
      -- names are tokens: a space or an empty name was sent, and nginx answered 400
      { { url = u, headers = { ["X A"] = "1" } },
        "bad option 'headers' to 'request' (invalid header name 'X A')" },
      { { url = u, headers = { ": x" } },
        "bad option 'headers' to 'request' (invalid header name in ': x')" },
      { { url = u, headers = { "X(1): x" } },
        "bad option 'headers' to 'request' (invalid header name in 'X(1): x')" },
    }
    for _, c in ipairs(cases) do
      assert.are.equal(c[2], h.error_of(function() return request(c[1]) end))
    end
    assert.are.equal("bad argument #1 to 'request' (table expected, got string)",
      h.error_of(function() return request(u) end))
    assert.are.equal("bad option 'follow' to 'get' (boolean expected, got 1)",
      h.error_of(function() return luapool.http.get(u, { follow = 1 }) end))
    assert.are.equal("unknown option 'method' to 'get'",
      h.error_of(function() return luapool.http.get(u, { method = "GET" }) end))
  end)

  it("works in thread and process tasks", function()
    for _, new in ipairs { luapool.threadpool.new, luapool.processpool.new } do
      local pool <close> = new { max_workers = 2 }
      local urls = {}
      for i = 1, 6 do urls[i] = srv:url("/echo") end
      local got = pool:map(function(u)
        local r = assert(luapool.http.request { url = u, method = "POST", body = "b" })
        return r.status .. r.body .. r.attempts
      end, urls)
      for i = 1, 6 do assert.are.equal("200b1", got[i]) end
    end
  end)

  it("stops at a thread task's deadline, even when the task catches the failure", function()
    local pool <close> = luapool.threadpool.new { max_workers = 1, name = "rq", task_timeout = 0.5 }
    local t0 = luapool.now()
    local e = pool:submit(function(u)
      return pcall(luapool.http.request, { url = u, timeout = 4 })
    end, srv:url("/sleep?s=5")):exception()
    assert.are.equal("timeout", e.kind)
    assert.matches("^task #1 exceeded its deadline of 0%.5 seconds in worker rq%-1$", e.message)
    assert.is_true(luapool.now() - t0 < 3)
  end)

  it("is cut short by Ctrl-C in the main script, in a transfer or in a backoff wait", function()
    if os.getenv("LUAPOOL_SANITIZER") == "tsan" then
      -- TSan holds a signal back until the thread calls an intercepted function
      return pending("signals are deferred under tsan")
    end
    -- The requests the fixture has taken (stub_status's third counter); this
    -- one included: it counts a request when it arrives.
    local function taken()
      local r = assert(request { url = srv:url("/nginx_status") })
      return assert(tonumber(r.body:match("\n%s*%d+%s+%d+%s+(%d+)")), r.body)
    end
    -- the answer, or the retry, would come 30 s on: well before that is
    -- "cut short", however slowly the machine gets the signal to it
    for _, url in ipairs { srv:url("/sleep?s=30"), srv:url("/flaky?fail=1&retry_after=30&key=" .. key()) } do
      local script = h.tempfile([[
        local url, ready_file = ...
        local t0 = luapool.now()
        local ok, e = pcall(function()
          local f = assert(io.open(ready_file, "w")) f:write("ready\n") f:close()
          return luapool.http.request { url = url, retries = 1 }
        end)
        print(ok, e.kind, e.message, luapool.now() - t0 < 15)]])
      local out, pidf, ready = os.tmpname(), os.tmpname(), os.tmpname()
      os.remove(ready)
      local before = taken()
      assert(os.execute(("sh -c %s >/dev/null 2>&1"):format(q(("%s %s %s %s >%s 2>&1 </dev/null & echo $! >%s")
        :format(q(h.bin), q(script), q(url), q(ready), q(out), q(pidf))))))
      h.wait_until(function() return tonumber(h.slurp(pidf)) ~= nil end, "the pid", 10)
      local pid = tonumber(h.slurp(pidf))
      -- inside the pcall, then in the transfer (or the 30 s wait): the
      -- fixture has the script's request (each taken() is one of its own)
      h.wait_until(function() return h.slurp(ready) == "ready\n" end, "the script to be ready", 30)
      local polls = 0
      h.wait_until(function()
        polls = polls + 1
        return taken() - before - polls >= 1
      end, "the script's request to reach the fixture", 30)
      assert(os.execute("kill -INT " .. pid))
      h.wait_until(function() return not h.alive(pid) end, "luapool to exit", 10)
      assert.are.equal("false\tinterrupted\tthe script received SIGINT\ttrue\n", h.slurp(out))
      os.remove(script) os.remove(out) os.remove(pidf) os.remove(ready)
    end
  end)

  -- A script at its descriptor limit, its loop made by a first request to
  -- path; then a request that needs a new connection.
  local function at_limit(path)
    local script = h.tempfile([[
      local url = ...
      assert(luapool.http.request { url = url })
      local held = {}
      while true do
        local f = io.open("/dev/null")
        if not f then break end
        held[#held + 1] = f
      end
      print(luapool.http.request { url = "http://127.0.0.1:1/" })
      print(pcall(luapool.kernels.fetch_length, "http://127.0.0.1:1/"))]])
    local p = io.popen(("ulimit -n 64; %s %s %s 2>&1"):format(q(h.bin), q(script), q(srv:url(path))))
    local out = p:read("a")
    p:close()
    os.remove(script)
    return out
  end

  it("says descriptors ran out, naming RLIMIT_NOFILE", function()
    -- (the first answer closes its connection: nothing is kept to give way)
    assert.matches("^nil\tGET http://127%.0%.0%.1:1/: out of file descriptors %(Too many open files%): "
      .. "raise RLIMIT_NOFILE %(ulimit %-n: soft limit 64, hard limit %d+%) or put fewer requests in flight\n"
      .. "false\tfetch_length: http://127%.0%.0%.1:1/: out of file descriptors %(Too many open files%)",
      at_limit("/close"))
  end)

  it("closes a kept-alive connection for a new one at the descriptor limit", function()
    -- the first answer's connection stays idle: the next request takes its
    -- descriptor, and so reaches port 1 (refused), as does the one after
    assert.matches("^nil\tGET http://127%.0%.0%.1:1/: Couldn't connect to server %(Failed to connect to "
      .. "127%.0%.0%.1 port 1 after %d+ ms: Couldn't connect to server%)\nfalse\tfetch_length: "
      .. "http://127%.0%.0%.1:1/: Couldn't connect to server %(Failed to connect to 127%.0%.0%.1 port 1 after "
      .. "%d+ ms: Couldn't connect to server%)\n$", at_limit("/"))
  end)
end)

describe("the nginx fixture", function()
  it("does not outlive the process that started it (killed with a child holding on)", function()
    -- the owner leaves a child running (it inherits the owner's end of the
    -- watchdog's pipe): the watchdog still sees the owner go
    local childfile = h.tempfile("")
    local script = h.tempfile(([[
      local srv = assert(require("luapool.fixture").start())
      local pid = assert(io.open("/proc/self/stat")):read("a"):match("^(%%d+)")
      io.stdout:write(pid, " ", srv.pid, " ", srv.dir, "\n")
      io.stdout:flush()
      os.execute("sleep 30 </dev/null >/dev/null 2>&1 & echo $! >%s")
      require("luapool").sleep(60)
    ]]):format(q(childfile)))
    local p = io.popen(q(h.bin) .. " " .. q(script) .. " 2>&1", "r")
    local line = p:read("l")
    assert.is_string(line)
    local owner, nginx, dir = line:match("^(%d+) (%d+) (%S+)$")
    assert.is_truthy(owner, line)
    assert.is_true(h.alive(nginx))
    os.execute("kill -KILL " .. owner)
    p:close()
    h.wait_until(function() return not h.alive(nginx) end, "nginx to stop", 10)
    h.wait_until(function() return io.open(dir .. "/nginx.conf") == nil end, "its directory to go", 10)
    local child = (h.slurp(childfile) or ""):match("%d+")
    if child then os.execute("kill " .. child .. " 2>/dev/null") end
    os.remove(childfile)
    os.remove(script)
  end)
end)
