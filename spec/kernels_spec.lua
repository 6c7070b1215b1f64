-- Native kernels: sum_squares (exact) and HTTP through libcurl, called
-- directly and as task functions on both pools, against the nginx fixture.
local luapool = require "luapool"
local h = require "helper"
local K = luapool.kernels

local REFERENCE = {
  { 10000000, "333333283333335000000" },
  { 12000000, "575999928000002000000" },
  { 11000000, "443666606166668500000" },
  { 9000000, "242999959500001500000" },
  { 13000000, "732333248833335500000" },
}

describe("sum_squares", function()
  it("is exact for small n", function()
    local expect = { [0] = "0", [1] = "0", [2] = "1", [3] = "5", [10] = "285", [100] = "328350" }
    for n, s in pairs(expect) do assert.are.equal(s, tostring(K.sum_squares(n))) end
  end)

  it("is exact past 2^63 for the reference numbers, as Python prints them", function()
    for _, r in ipairs(REFERENCE) do assert.are.equal(r[2], tostring(K.sum_squares(r[1]))) end
  end)

  it("returns a luapool.int128 that travels back from workers of both pools", function()
    for _, new in ipairs { luapool.threadpool.new, luapool.processpool.new } do
      local pool <close> = new { max_workers = 2 }
      local ns = {}
      for i, r in ipairs(REFERENCE) do ns[i] = r[1] end
      local results = pool:map(K.sum_squares, ns)
      for i, r in ipairs(REFERENCE) do
        assert.are.equal(r[2], tostring(results[i]))
        assert.are.equal(luapool.int128(r[2]), results[i])
      end
      assert.are.equal("285", tostring(pool:submit(K.sum_squares, 10):result()))
    end
  end)

  it("refuses bad arguments with lua-style messages, directly and in workers", function()
    local cases = {
      { { "10" }, "bad argument #1 to 'sum_squares' (number expected, got string)" },
      { { -5 }, "bad argument #1 to 'sum_squares' (non-negative integer expected, got -5)" },
      { { 1.5 }, "bad argument #1 to 'sum_squares' (number has no integer representation)" },
      { { 8000000000000 }, "bad argument #1 to 'sum_squares' (n too large: the sum would exceed 2^127-1)" },
      { {}, "bad argument #1 to 'sum_squares' (number expected, got no value)" },
      { { {} }, "bad argument #1 to 'sum_squares' (number expected, got table)" },
    }
    local pool <close> = luapool.processpool.new { max_workers = 1 }
    for _, c in ipairs(cases) do
      local ok, err = pcall(K.sum_squares, table.unpack(c[1]))
      assert.is_false(ok)
      assert.are.equal(c[2], err)
      local e = pool:submit(K.sum_squares, table.unpack(c[1])):exception()
      assert.are.equal("task", e.kind)
      assert.are.equal(c[2], e.message)
    end
  end)
end)

describe("fetch_length and http.get", function()
  local srv
  setup(function() srv = h.fixture() end)
  teardown(function() if srv then srv:stop() end end)

  it("returns the body length and status", function()
    assert.are.same({ 1000, 200 }, { K.fetch_length(srv:url("/bytes?n=1000")) })
    assert.are.same({ 0, 200 }, { K.fetch_length(srv:url("/bytes?n=0")) })
    assert.are.same({ 10, 200 }, { K.fetch_length(srv:url("/redirect")) })
  end)

  it("gives a 404 page its length, not an error", function()
    local len, status = K.fetch_length(srv:url("/status/404"))
    assert.are.equal(404, status)
    assert.is_true(len > 0)
  end)

  it("fails with the URL and curl's reason on transport failures", function()
    local refused = "http://127.0.0.1:1/"
    local ok, err = pcall(K.fetch_length, refused)
    assert.is_false(ok)
    assert.matches("^fetch_length: http://127%.0%.0%.1:1/: Couldn't connect to server %(", err)
    local drop = srv:url("/drop")
    ok, err = pcall(K.fetch_length, drop)
    assert.is_false(ok)
    assert.are.equal("fetch_length: " .. drop ..
      ": Server returned nothing (no headers, no data) (Empty reply from server)", err)
    local slow = srv:url("/sleep?s=3")
    ok, err = pcall(K.fetch_length, slow, 0.2)
    assert.is_false(ok)
    assert.matches("^fetch_length: " .. slow:gsub("%p", "%%%0") .. ": Timeout was reached %(", err)
  end)

  it("runs as a task on both pools, failures as task errors", function()
    for _, new in ipairs { luapool.threadpool.new, luapool.processpool.new } do
      local pool <close> = new { max_workers = 4, name = "net" }
      local urls = {}
      for i = 1, 12 do urls[i] = srv:url("/bytes?n=" .. i * 100) end
      local lens = pool:map(K.fetch_length, urls)
      for i = 1, 12 do assert.are.equal(i * 100, lens[i]) end
      local f = pool:submit(K.fetch_length, "http://127.0.0.1:1/")
      local e = f:exception()
      assert.are.equal("task", e.kind)
      assert.matches("^net%-%d$", e.worker)
      assert.matches("^fetch_length: http://127%.0%.0%.1:1/: Couldn't connect to server", e.message)
      assert.has_error(function() f:result() end)
    end
  end)

  it("fetches concurrently: 20 fetches of 0.3 s on 20 threads overlap", function()
    local pool <close> = luapool.threadpool.new { max_workers = 20 }
    local fs = {}
    for i = 1, 20 do fs[i] = pool:submit(K.fetch_length, srv:url("/sleep?s=0.3&i=" .. i)) end
    -- bounded wait: sequential would need 6 s; this only proves nothing hangs
    for i = 1, 20 do assert.are.equal(3, (fs[i]:result(5))) end
  end)

  it("http.get returns status, body, headers, url and time", function()
    local r = assert(luapool.http.get(srv:url("/bytes?n=5")))
    assert.are.equal(200, r.status)
    assert.are.equal("xxxxx", r.body)
    assert.are.equal("string", type(r.headers["content-type"]))
    assert.are.equal(srv:url("/bytes?n=5"), r.url)
    assert.is_true(r.time >= 0)
    local nothing, msg = luapool.http.get("http://127.0.0.1:1/")
    assert.is_nil(nothing)
    assert.matches("^GET http://127%.0%.0%.1:1/: Couldn't connect to server", msg)
    assert.has_error(function() luapool.http.get(srv:url("/"), { timeout = -1 }) end,
      "bad option 'timeout' to 'get' (positive number expected, got -1)")
  end)

  it("http.get works inside a task", function()
    local pool <close> = luapool.threadpool.new { max_workers = 2 }
    local body = pool:submit(function(u) return luapool.http.get(u).body end, srv:url("/")):result()
    assert.are.equal("luapool fixture\n", body)
  end)
end)

describe("http.get and fetch_length stop", function()
  local srv
  setup(function() srv = h.fixture() end)
  teardown(function() if srv then srv:stop() end end)

  it("at a thread task's deadline, even when the task catches the failure", function()
    -- before, http.get ran its 5 s transfer to the end
    local pool <close> = luapool.threadpool.new { max_workers = 2, name = "dl", task_timeout = 0.5 }
    local slow = srv:url("/sleep?s=5")
    local jobs = {
      function(u) return luapool.http.get(u) end,
      function(u) return pcall(luapool.http.get, u, { timeout = 4 }) end,
      function(u) return luapool.kernels.fetch_length(u) end,
    }
    for i, job in ipairs(jobs) do
      local t0 = luapool.now()
      local e = pool:submit(job, slow):exception()
      local took = luapool.now() - t0
      assert.are.equal("timeout", e.kind)
      assert.matches("^task #" .. i .. " exceeded its deadline of 0%.5 seconds in worker dl%-%d$", e.message)
      assert.is_true(took < 3, ("took %.1f s"):format(took))
    end
  end)

  it("http.get refuses unknown options", function()
    local url = srv:url("/")
    assert.are.equal("unknown option 'timout' to 'get'",
      h.error_of(function() return luapool.http.get(url, { timout = 0.2 }) end))
    assert.are.equal("unknown option '1' to 'get'",
      h.error_of(function() return luapool.http.get(url, { 0.2 }) end))
    assert.are.equal("unknown option 'Follow' to 'get'",
      h.error_of(function() return luapool.http.get(url, { timeout = 1, Follow = true }) end))
    local pool <close> = luapool.threadpool.new { max_workers = 1 }
    local e = pool:submit(function(u) return luapool.http.get(u, { timout = 0.2 }) end, url):exception()
    assert.are.equal("task", e.kind)
    assert.matches(": unknown option 'timout' to 'get'$", e.message)
  end)

  it("fetch_length refuses an argument past its URL and timeout, wherever it runs", function()
    -- (it was ignored; an iopool's native task ran such a call inline, blocking its loop)
    local want = "bad argument #3 to 'fetch_length' (no value expected: it takes a URL and an optional timeout)"
    local u = "http://127.0.0.1:1/"
    assert.are.same({ false, want }, { pcall(K.fetch_length, u, 5, "extra") })
    assert.are.same({ false, (want:gsub("#3", "#4")) }, { pcall(K.fetch_length, u, nil, nil, {}) })
    local io <close> = luapool.iopool.new {}
    assert.are.same({ false, want }, io:submit(function(url)
      return { pcall(luapool.kernels.fetch_length, url, 5, "extra") }
    end, u):result(20))
    local tp <close> = luapool.threadpool.new { max_workers = 1 }
    local e = h.result_error(tp:submit(K.fetch_length, u, 5, true), 20)
    assert.are.same({ "task", want }, { e.kind, e.message })
  end)

  it("URLs must be strings, not numbers", function()
    -- luaL_checklstring would turn 5 into "5", which libcurl reads as 0.0.0.5
    assert.are.equal("bad argument #1 to 'get' (string expected, got number)",
      h.error_of(function() return luapool.http.get(5) end))
    assert.are.equal("bad argument #1 to 'get' (string expected, got table)",
      h.error_of(function() return luapool.http.get({}) end))
    -- called through pcall (no calling line to name it), as directly
    local ok, err = pcall(luapool.http.get, 5)
    assert.are.same({ false, "bad argument #1 to 'get' (string expected, got number)" }, { ok, err })
    ok, err = pcall(luapool.http.get, "http://127.0.0.1:1/", 5)
    assert.are.same({ false, "bad argument #2 to 'get' (table expected, got number)" }, { ok, err })
    ok, err = pcall(luapool.threadpool.new, "x")
    assert.are.same({ false, "bad argument #1 to 'new' (table expected, got string)" }, { ok, err })
    ok, err = pcall(K.fetch_length, 5)
    assert.is_false(ok)
    assert.are.equal("bad argument #1 to 'fetch_length' (string expected, got number)", err)
  end)

  it("leave every socket close-on-exec, libcurl's included", function()
    assert(luapool.http.get(srv:url("/bytes?n=3")))
    assert.are.equal(3, (K.fetch_length(srv:url("/bytes?n=3"))))
    local pool <close> = luapool.threadpool.new { max_workers = 1 }
    assert.are.equal(3, pool:submit(function(u) return #luapool.http.get(u).body end,
      srv:url("/bytes?n=3")):result())
    local pid = luapool.current_worker().pid
    local listing = io.popen("ls -l /proc/" .. pid .. "/fd"):read("a")
    local n = 0
    for fd, target in listing:gmatch(" (%d+) %-> (%S+)") do
      if target:match("^socket:") then
        local info = h.slurp("/proc/" .. pid .. "/fdinfo/" .. fd)
        local flags = info and tonumber(info:match("flags:%s*(%d+)"), 8)
        if flags then -- (gone meanwhile: not ours to check)
          n = n + 1
          assert.are_not.equal(0, flags & 0x80000, "socket fd " .. fd .. " lacks O_CLOEXEC")
        end
      end
    end
    assert.is_true(n >= 3, "expected libcurl's sockets, found " .. n)
  end)
end)
