-- luapool.bench (the benchmark library) and the suites in scripts/bench/.
local helper = require "helper"
require "luapool"
local bench = require "luapool.bench"

-- A minimal JSON reader, enough for the library's own output.
local function json_decode(text)
  local pos = 1
  local function ws() pos = text:find("[^ \t\r\n]", pos) or #text + 1 end
  local value
  local function str()
    local out = {}
    pos = pos + 1
    while true do
      local c = text:sub(pos, pos)
      if c == '"' then pos = pos + 1 break end
      if c == "\\" then
        local e = text:sub(pos + 1, pos + 1)
        if e == "u" then
          out[#out + 1] = utf8.char(tonumber(text:sub(pos + 2, pos + 5), 16))
          pos = pos + 6
        else
          out[#out + 1] = ({ n = "\n", t = "\t", r = "\r", b = "\b", f = "\f" })[e] or e
          pos = pos + 2
        end
      else
        assert(c ~= "", "unterminated string")
        out[#out + 1] = c
        pos = pos + 1
      end
    end
    return table.concat(out)
  end
  function value()
    ws()
    local c = text:sub(pos, pos)
    if c == "{" then
      local t = {}
      pos = pos + 1
      ws()
      if text:sub(pos, pos) == "}" then pos = pos + 1 return t end
      while true do
        ws()
        assert(text:sub(pos, pos) == '"', "object key expected at " .. pos)
        local k = str()
        ws()
        assert(text:sub(pos, pos) == ":", ": expected at " .. pos)
        pos = pos + 1
        t[k] = value()
        ws()
        local d = text:sub(pos, pos)
        pos = pos + 1
        if d == "}" then return t end
        assert(d == ",", ", or } expected at " .. pos)
      end
    elseif c == "[" then
      local t = {}
      pos = pos + 1
      ws()
      if text:sub(pos, pos) == "]" then pos = pos + 1 return t end
      while true do
        t[#t + 1] = value()
        ws()
        local d = text:sub(pos, pos)
        pos = pos + 1
        if d == "]" then return t end
        assert(d == ",", ", or ] expected at " .. pos)
      end
    elseif c == '"' then
      return str()
    elseif text:find("^true", pos) then pos = pos + 4 return true
    elseif text:find("^false", pos) then pos = pos + 5 return false
    elseif text:find("^null", pos) then pos = pos + 4 return nil
    else
      local s, e = text:find("^-?%d+%.?%d*[eE]?[-+]?%d*", pos)
      assert(s, "unexpected character at " .. pos .. ": " .. c)
      pos = e + 1
      return tonumber(text:sub(s, e))
    end
  end
  local v = value()
  ws()
  assert(pos > #text, "trailing text at " .. pos)
  return v
end

local function count(s, pattern)
  local n = 0
  for _ in s:gmatch(pattern) do n = n + 1 end
  return n
end

describe("bench statistics", function()
  it("median of odd and even counts, without touching the list", function()
    local list = { 3, 1, 2 }
    assert.equal(2, bench.median(list))
    assert.same({ 3, 1, 2 }, list)
    assert.equal(2.5, bench.median { 4, 1, 3, 2 })
    assert.equal(7, bench.median { 7 })
    assert.equal(0.25, bench.median { 0.5, 0 })
    assert.is_nil(bench.median {})
  end)

  it("min and max", function()
    assert.equal(1, bench.min { 3, 1, 2 })
    assert.equal(3, bench.max { 3, 1, 2 })
    assert.equal(-1.5, bench.min { 0, -1.5, 2 })
    assert.equal(5, bench.max { 5 })
    assert.is_nil(bench.min {})
  end)

  it("paired_ratio is the median of run-by-run ratios", function()
    assert.equal(2, bench.paired_ratio({ 2, 4, 6 }, { 1, 2, 3 }))
    -- one disturbed run does not move it
    assert.equal(0.5, bench.paired_ratio({ 0.5, 0.5, 5, 0.5, 0.5 }, { 1, 1, 1, 1, 1 }))
    -- even count: mean of the middle two ratios
    assert.equal(2.5, bench.paired_ratio({ 1, 4, 9, 16 }, { 1, 2, 3, 4 }))
    assert.is_nil(bench.paired_ratio({}, {}))
    assert.has_error(function() bench.paired_ratio({ 1, 2 }, { 1 }) end)
  end)

  it("pairing cancels drift", function()
    -- The machine slows down round after round (drift factors 1..6); the
    -- case truly takes half its baseline's time.
    local drift = { 1, 2, 3, 4, 5, 6 }
    -- Measured one after the other (case in rounds 1-3, baseline in 4-6),
    -- the ratio of medians is off by a factor 2.5:
    local case_first = { 0.5 * drift[1], 0.5 * drift[2], 0.5 * drift[3] }
    local base_after = { drift[4], drift[5], drift[6] }
    assert.equal(0.2, bench.median(case_first) / bench.median(base_after))
    -- Interleaved (each round runs both) and paired, the drift cancels:
    local case, base = {}, {}
    for r, f in ipairs(drift) do case[r], base[r] = 0.5 * f, f end
    assert.equal(0.5, bench.paired_ratio(case, base))
  end)

  it("formats human units", function()
    assert.equal("812 ns", bench.format_time(812e-9))
    assert.equal("12.3 µs", bench.format_time(12.34e-6))
    assert.equal("4.56 ms", bench.format_time(4.56e-3))
    assert.equal("1.23 s", bench.format_time(1.234))
    assert.equal("-", bench.format_time(nil))
    assert.equal("0.50x", bench.format_ratio(0.5))
    assert.equal("12.3 MiB", bench.format_kb(12.3 * 1024))
    assert.equal("341 MB/s", bench.format_rate(341e6, "B"))
    assert.equal("45.6 k tasks/s", bench.format_rate(45.6e3, "task"))
  end)
end)

describe("bench command line", function()
  it("parses the standard options", function()
    local o = assert(bench.parse_args { "--runs", "3", "--warmup=0", "--json", "a.json", "--quick" })
    assert.equal(3, o.runs)
    assert.equal(0, o.warmup)
    assert.equal("a.json", o.json)
    assert.is_true(o.quick)
  end)

  it("rejects unknown options and bad values", function()
    local o, err = bench.parse_args { "--bogus" }
    assert.is_nil(o)
    assert.matches("unknown option '%-%-bogus'", err)
    assert.is_nil((bench.parse_args { "--runs", "0" }))
    assert.is_nil((bench.parse_args { "--runs" }))
    assert.is_nil((bench.parse_args { "stray" }))
    local x = assert(bench.parse_args({ "--tasks", "7" }, { { "tasks", "N", "integer", "tasks" } }))
    assert.equal(7, x.tasks)
  end)

  it("exits 2 with the usage for an unknown option", function()
    local script = helper.tempfile([[
      local bench = require "luapool.bench"
      local suite = bench.suite { name = "tiny", args = { ... } }
      suite:case { name = "a", body = function() end }
      suite:run()
    ]])
    local out, err, code = helper.run { script, "--runs", "1", "--frobnicate" }
    os.remove(script)
    assert.equal(2, code)
    assert.equal("", out)
    assert.matches("unknown option '%-%-frobnicate'", err)
    assert.matches("usage: luapool", err)
    assert.matches("%-%-runs N", err)
  end)
end)

describe("a bench suite", function()
  -- Fake bodies on a fake clock: case "fast" takes 1 s, "slow" 2 s, the
  -- baseline "base" 4 s, "alone" (its own group, no baseline) 3 s.
  local function tiny_suite(args)
    local t = 0
    local calls = {}
    local text = {}
    local suite = bench.suite {
      name = "tiny", title = "fake bodies", clock = function() return t end, progress = false,
      output = function(s) text[#text + 1] = s end,
    }
    local function body(seconds, name)
      return function() t = t + seconds; calls[#calls + 1] = name end
    end
    suite:case { name = "base", group = "g", baseline = "base", body = body(4, "base") }
    suite:product {
      group = "g", name = "{pool} x{workers}", axes = { { "pool", { "p1", "p2" } }, { "workers", { 1, 2 } } },
      body = function(_, p) t = t + (p.pool == "p1" and 1 or 2) / p.workers; calls[#calls + 1] = p.pool end,
      units = 10, unit = "task",
    }
    suite:case { name = "alone", group = "h", body = body(3, "alone") }
    suite:run(args)
    return suite, calls, table.concat(text)
  end

  it("interleaves the runs of a group and computes paired ratios", function()
    local suite, calls = tiny_suite { "--runs", "3", "--warmup", "1" }
    -- 5 cases in g, 1 in h; 4 rounds each
    assert.equal(4 * 6, #calls)
    -- each round of g runs each of its 5 cases once
    for round = 0, 3 do
      local seen = {}
      for k = 1, 5 do seen[#seen + 1] = calls[round * 5 + k] end
      table.sort(seen)
      assert.same({ "base", "p1", "p1", "p2", "p2" }, seen)
    end
    assert.equal(1, suite:result("base").ratio)
    assert.equal(0.25, suite:result("p1 x1").ratio)
    assert.equal(0.25, suite:result("p2 x2").ratio)
    assert.equal(0.5, suite:result("p2 x1").ratio)
    assert.is_nil(suite:result("alone").ratio)
    assert.equal(0.1, suite:result("p1 x1").per_unit)
    assert.same({ 3, 3, 3 }, suite:result("alone").runs)
  end)

  it("prints the machine and an aligned table", function()
    local _, _, text = tiny_suite { "--runs", "1", "--warmup", "0" }
    assert.matches("machine: ", text)
    assert.matches("luapool ", text)
    local header = text:match("\n(group%s+case%s+min%s+median%s+max%s+cpu%s+peak rss%s+ratio[^\n]*)\n")
    assert.truthy(header, text)
    assert.matches("per unit", header)
    assert.matches("\ng%s+p2 x1%s+2%.00 s%s+2%.00 s%s+2%.00 s", text)
    assert.matches("200 ms/task", text)
  end)

  it("writes JSON and CSV", function()
    local jf, cf = os.tmpname(), os.tmpname()
    tiny_suite { "--runs", "3", "--warmup", "0", "--json", jf, "--csv", cf }
    local doc = json_decode(assert(helper.slurp(jf)))
    local csv = assert(helper.slurp(cf))
    os.remove(jf); os.remove(cf)

    assert.equal("tiny", doc.suite)
    assert.equal(3, doc.runs)
    assert.is_table(doc.machine)
    assert.equal("string", type(doc.machine.cpu_model))
    assert.equal(6, #doc.cases)
    local by = {}
    for _, c in ipairs(doc.cases) do by[c.name] = c end
    local c = by["p1 x2"]
    assert.equal("g", c.group)
    assert.same({ pool = "p1", workers = 2 }, c.params)
    assert.same({ 0.5, 0.5, 0.5 }, c.runs)
    assert.equal(0.5, c.min)
    assert.equal(0.5, c.median)
    assert.equal(0.5, c.max)
    assert.equal("number", type(c.cpu_median))
    assert.equal(0.125, c.ratio)
    assert.equal("base", c.baseline)
    assert.equal(10, c.units)
    assert.is_nil(by.alone.ratio)      -- null
    assert.is_nil(by.alone.baseline)

    local lines = {}
    for line in csv:gmatch("[^\n]+") do lines[#lines + 1] = line end
    assert.equal(1 + 6, #lines)
    assert.equal(table.concat(bench.CSV_HEADER, ","), lines[1])
    assert.matches("^tiny,g,p1 x2,pool=p1;workers=2,3,0%.5,0%.5,0%.5,", lines[4])
    local fields = select(2, lines[4]:gsub(",", ",")) + 1
    assert.equal(#bench.CSV_HEADER, fields)
  end)

  it("draws an SVG line chart, one polyline per series", function()
    local suite = tiny_suite { "--runs", "1", "--warmup", "0" }
    local svg = assert(suite:svg_text { x = "workers", series = "pool", group = "g", log_x = true,
                                        title = "a <chart> & more", y_label = "seconds" })
    assert.matches("^<svg xmlns=\"http://www%.w3%.org/2000/svg\"", svg)
    assert.matches("</svg>\n$", svg)
    assert.equal(2, count(svg, "<polyline "))
    assert.equal(count(svg, "<g[ >]"), count(svg, "</g>"))
    assert.matches("a &lt;chart&gt; &amp; more", svg)
    assert.matches(">p1</text>", svg)    -- legend
    assert.matches(">p2</text>", svg)
    assert.matches("stroke%-dasharray", svg) -- "base" has no workers: a reference line
    assert.matches(">base %(4%.00 s%)</text>", svg)
    local path = os.tmpname()
    assert(suite:svg(path, { x = "workers", series = "pool", group = "g" }))
    assert.equal(2, count(assert(helper.slurp(path)), "<polyline "))
    os.remove(path)
    assert.is_nil((suite:svg_text { x = "nothing" }))
  end)
end)

describe("the suites in scripts/bench", function()
  local function smoke(name, extra)
    local args = { helper.source_dir .. "/scripts/bench/" .. name .. ".lua", "--quick", "--runs", "1", "--warmup", "0" }
    for _, a in ipairs(extra or {}) do args[#args + 1] = a end
    local out, err, code = helper.run(args)
    assert.equal(0, code, err)
    assert.matches("machine: ", out)
    assert.matches("\ngroup%s+case%s+min%s+median%s+max", out)
    return out, err
  end

  it("choose.lua runs and draws its charts", function()
    local dir = os.tmpname()
    local json = dir .. ".json"
    local out = smoke("choose", { "--json", json, "--svg", dir .. "-{chart}.svg" })
    assert.matches("io threadpool x8", out)
    assert.matches("lua processpool x2", out)
    local doc = json_decode(assert(helper.slurp(json)))
    assert.equal("choose", doc.suite)
    for _, chart in ipairs { "io", "cpu" } do
      local svg = assert(helper.slurp(dir .. "-" .. chart .. ".svg"), chart)
      assert.matches("^<svg", svg)
      assert.equal(chart == "io" and 2 or 6, count(svg, "<polyline "))
      os.remove(dir .. "-" .. chart .. ".svg")
    end
    os.remove(json)
    os.remove(dir)
  end)

  it("overhead.lua runs", function()
    local out = smoke("overhead")
    assert.matches("threadpool submit lua", out)
    assert.matches("processpool map kernel chunk=auto", out)
    assert.matches("µs/task", out)
  end)

  it("http.lua runs", function()
    local out = smoke("http")
    assert.matches("threadpool x100 fetch_length", out)
    assert.matches("req/s", out)
  end)

  it("codec.lua runs", function()
    local out = smoke("codec")
    assert.matches("records decode", out)
    assert.matches("B/s", out)
  end)

  it("peers.lua runs (peers whose tool is missing are skipped)", function()
    local out = smoke("peers")
    assert.matches("luapool processpool %(native kernel%)", out)
    assert.matches("luapool threadpool x16", out)
  end)
end)
