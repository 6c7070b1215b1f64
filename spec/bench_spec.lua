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

describe("the bench library's surface", function()
  -- Exactly what require "luapool.bench" has exposed since before it was
  -- split into lua/luapool/bench/*.lua: nothing lost, nothing internal leaked.
  local function keys(t)
    local list = {}
    for k, v in pairs(t) do list[#list + 1] = k .. ":" .. type(v) end
    table.sort(list)
    return list
  end

  it("has the same functions and fields", function()
    assert.same({
      "CSV_HEADER:table", "Suite:table", "array:function", "array_mt:table", "csv_field:function",
      "describe_machine:function", "format_count:function", "format_kb:function", "format_rate:function",
      "format_ratio:function", "format_table:function", "format_time:function", "json:function",
      "loadavg:function", "machine:function", "max:function", "mean:function", "median:function",
      "min:function", "null:table", "paired_ratio:function", "parse_args:function", "sig3:function",
      "suite:function", "usage:function",
    }, keys(bench))
    assert.same({
      "__index:table", "case:function", "chart:function", "note:function", "parse:function",
      "product:function", "report:function", "result:function", "run:function", "svg:function",
      "svg_text:function", "table:function", "usage:function", "write_csv:function", "write_json:function",
    }, keys(bench.Suite))
    assert.equal(bench.Suite, bench.Suite.__index)
    assert.equal(bench.Suite, getmetatable(bench.suite { name = "x" }))
    assert.equal("json.array", bench.array_mt.__name)
    assert.equal(bench.array_mt, getmetatable(bench.array {}))
    assert.equal("null", tostring(bench.null))
    assert.equal("json.null", getmetatable(bench.null).__name)
  end)

  it("finds every module under stock lua5.4 with the specs' LUA_PATH", function()
    for _, name in ipairs { "stats", "format", "machine", "json", "cli", "runner", "report", "svg" } do
      local mod = require("luapool.bench." .. name)
      assert.is_table(mod, name)
    end
  end)
end)

describe("bench statistics, edge cases", function()
  it("mean, and empty lists", function()
    assert.equal(3, bench.mean { 1, 2, 3, 6 })
    assert.equal(0.5, bench.mean { 0.5 })
    assert.is_nil(bench.mean {})
    assert.is_nil(bench.max {})
  end)

  it("rejects what is not a list of numbers", function()
    assert.equal("median: list of numbers expected", helper.error_of(bench.median, { 1, "2" }))
    assert.equal("mean: list of numbers expected", helper.error_of(bench.mean, nil))
    assert.equal("min: list of numbers expected", helper.error_of(bench.min, "x"))
    assert.equal("paired_ratio: 2 times against 1 baseline times",
      helper.error_of(bench.paired_ratio, { 1, 2 }, { 1 }))
    -- pairs whose baseline is not positive are skipped
    assert.equal(3, bench.paired_ratio({ 1, 3, 5 }, { 0, 1, -1 }))
    assert.is_nil(bench.paired_ratio({ 1 }, { 0 }))
  end)
end)

describe("bench formats", function()
  it("three significant digits", function()
    assert.equal("123", bench.sig3(123.4))
    assert.equal("12.3", bench.sig3(12.34))
    assert.equal("1.23", bench.sig3(1.234))
    assert.equal("-12.3", bench.sig3(-12.34))
  end)

  it("times, sizes, ratios at their edges", function()
    assert.equal("0 s", bench.format_time(0))
    assert.equal("-", bench.format_time(0 / 0))
    assert.equal("100 s", bench.format_time(100))
    assert.equal("999 ns", bench.format_time(999e-9))
    assert.equal("-", bench.format_kb(nil))
    assert.equal("812 KiB", bench.format_kb(812))
    assert.equal("1.20 GiB", bench.format_kb(1.2 * 1024 * 1024))
    assert.equal("-", bench.format_ratio(nil))
    assert.equal("150x", bench.format_ratio(150))
    assert.equal("12.3x", bench.format_ratio(12.34))
  end)

  it("counts and rates with SI prefixes", function()
    assert.equal("950", bench.format_count(950))
    assert.equal("12.3 k", bench.format_count(12345))
    assert.equal("4.56 M", bench.format_count(4.56e6))
    assert.equal("1.20 G", bench.format_count(1.2e9))
    assert.equal("-", bench.format_count(nil))
    assert.equal("12.4 k req/s", bench.format_rate(12.4e3, "req"))
    assert.equal("950 req/s", bench.format_rate(950, "req"))
    assert.equal("950 B/s", bench.format_rate(950, "B"))
    assert.equal("5.00 units/s", bench.format_rate(5))
    assert.equal("-", bench.format_rate(1 / 0, "B"))
    assert.equal("-", bench.format_rate(nil, "B"))
  end)

  it("aligns a table by display width, with separators", function()
    local text = bench.format_table({ "a", "bb" }, { { "xyz", "1" }, { separator = true }, { "q", "5 µs" } },
      { "l", "r" })
    assert.equal("a      bb\n---  ----\nxyz     1\n\nq    5 µs\n", text)
  end)
end)

describe("bench JSON and CSV", function()
  it("encodes scalars", function()
    assert.equal("null", bench.json(nil))
    assert.equal("null", bench.json(bench.null))
    assert.equal("true", bench.json(true))
    assert.equal("3", bench.json(3))
    assert.equal("0.1", bench.json(0.1))
    assert.equal("2", bench.json(2.0))
    assert.equal("0.33333333333333331", bench.json(1 / 3))
    assert.equal("9007199254740992", bench.json(2.0 ^ 53))
    assert.equal("null", bench.json(0 / 0))
    assert.equal("null", bench.json(-1 / 0))
    assert.equal([["a\"b\\c\n\t\u0001"]], bench.json('a"b\\c\n\t\1'))
  end)

  it("encodes arrays and objects (sorted keys, integers first)", function()
    assert.equal("[1,2,3]", bench.json { 1, 2, 3 })
    assert.equal("[1, 2, 3]", bench.json({ 1, 2, 3 }, 2))
    assert.equal("{}", bench.json {})
    assert.equal("[]", bench.json(bench.array {}))
    assert.equal('{"a":1,"b":[1,null]}', bench.json { b = { 1, bench.null }, a = 1 })
    assert.equal('{"10":1,"x":2}', bench.json { x = 2, [10] = 1 })
    assert.equal('{\n  "a": [\n    1,\n    {\n      "b": 2\n    }\n  ]\n}', bench.json({ a = { 1, { b = 2 } } }, 2))
    assert.equal("json: cannot encode a key of type boolean", helper.error_of(bench.json, { [true] = 1 }))
    assert.equal("json: cannot encode a function", helper.error_of(bench.json, { f = print }))
  end)

  it("quotes CSV fields", function()
    assert.equal("", bench.csv_field(nil))
    assert.equal("", bench.csv_field(bench.null))
    assert.equal("7", bench.csv_field(7))
    assert.equal("0.3", bench.csv_field(0.1 + 0.2))
    assert.equal('"a,b"', bench.csv_field("a,b"))
    assert.equal('"say ""hi"""', bench.csv_field('say "hi"'))
    assert.equal('"x\ny"', bench.csv_field("x\ny"))
  end)
end)

describe("bench command line, in detail", function()
  it("writes the usage with defaults and extra options", function()
    local text = bench.usage("s.lua", { { "tasks", "N", "integer", "tasks (default %s)" },
                                        { name = "fast", type = "flag", help = "go fast" } },
                             { runs = 5, warmup = 1 })
    local lines = {}
    for line in text:gmatch("[^\n]+") do lines[#lines + 1] = line end
    assert.equal("usage: luapool s.lua [--runs N] [--warmup N] [--json FILE] [--csv FILE] [--svg FILE] "
      .. "[--quick] [--filter PATTERN] [--tasks N] [--fast]", lines[1])
    assert.equal("  --runs N         timed rounds per case (default 5)", lines[2])
    assert.equal("  --warmup N       untimed rounds first (default 1)", lines[3])
    assert.equal("  --tasks N        tasks (default ?)", lines[9])
    assert.equal("  --fast           go fast", lines[10])
    assert.equal(10, #lines)
    assert.matches("^usage: luapool SUITE%.lua ", bench.usage())
  end)

  it("parses numbers, flags and inline values, and says what is wrong", function()
    local extra = { { "rate", "X", "number", "" }, { "fast", nil, "flag", "" } }
    local o = assert(bench.parse_args({ "--rate", "1.5", "--fast", "--runs=2.0", "--filter", "x", "-h" }, extra))
    assert.same({ rate = 1.5, fast = true, runs = 2, filter = "x", help = true }, o)
    assert.equal(2, o.runs)
    assert.equal("integer", math.type(o.runs))
    assert.is_true(assert(bench.parse_args { "--help" }).help)
    local function err(args) return select(2, bench.parse_args(args, extra)) end
    assert.equal("option --rate needs a number, got 'x'", err { "--rate", "x" })
    assert.equal("option --fast takes no value", err { "--fast=1" })
    assert.equal("option --runs needs N", err { "--runs" })
    assert.equal("option --runs needs an integer >= 1, got '0'", err { "--runs", "0" })
    assert.equal("option --warmup needs an integer >= 0, got '-1'", err { "--warmup", "-1" })
    assert.equal("option --runs needs an integer >= 1, got '1.5'", err { "--runs=1.5" })
    assert.equal("unexpected argument 'stray'", err { "stray" })
    assert.equal("unknown option '--bogus=1'", err { "--bogus=1" })
  end)

  it("exits 2 for a bad --filter pattern, 0 with the usage for --help", function()
    local script = helper.tempfile([[
      local bench = require "luapool.bench"
      local suite = bench.suite { name = "tiny", title = "a title", args = { ... } }
      suite:case { name = "a", body = function() end }
      suite:run()
    ]])
    local out, err, code = helper.run { script, "--filter", "[" }
    assert.equal(2, code)
    assert.equal("", out)
    assert.matches("^tiny: bad pattern for %-%-filter: %[\nusage: luapool ", err)
    out, err, code = helper.run { script, "--help" }
    os.remove(script)
    assert.equal(0, code)
    assert.equal("", err)
    assert.matches("^tiny: a title\nusage: luapool ", out)
  end)

  it("exits 2 before any run for an output file it cannot write or a pattern that fails on a name", function()
    local ran = os.tmpname()
    local script = helper.tempfile(([[
      local bench = require "luapool.bench"
      local suite = bench.suite { name = "tiny", title = "a title", args = { ... } }
      suite:case { name = "a%%d", body = function() io.open(%q, "a"):write("ran\n"):close() end }
      suite:run()
    ]]):format(ran))
    local out, err, code = helper.run { script, "--json", "/nonexistent/dir/out.json" }
    assert.equal(2, code)
    assert.equal("", out)
    assert.equal("tiny: cannot write --json: /nonexistent/dir/out.json: No such file or directory\n", err)
    out, err, code = helper.run { script, "--csv", "/nonexistent/dir/out.csv" }
    assert.equal(2, code)
    assert.equal("", out)
    assert.equal("tiny: cannot write --csv: /nonexistent/dir/out.csv: No such file or directory\n", err)
    -- "%f" is a frontier without its set: "" gets past it, a name does not
    out, err, code = helper.run { script, "--filter", "a%f" }
    assert.equal(2, code)
    assert.equal("", out)
    assert.matches("^tiny: bad pattern for %-%-filter: a%%f %(missing '%[' after '%%f' in pattern%)\n$", err)
    local f = assert(io.open(ran))
    local text = f:read("a")
    f:close()
    os.remove(ran)
    os.remove(script)
    assert.equal("", text)
  end)

  it("ends with the host's interrupted exit 130 when a case is interrupted, not a failed case", function()
    local script = helper.tempfile([[
      local bench = require "luapool.bench"
      local suite = bench.suite { name = "tiny", title = "a title", args = { ... } }
      suite:case { name = "a", body = function()
        local pool <close> = threadpool.new { max_workers = 1 }
        local p = io.popen("kill -INT " .. luapool.current_worker().pid)
        p:close()
        pool:submit(luapool.sleep, 30):result()
      end }
      suite:run()
    ]])
    local _, err, code = helper.run { script, "--runs", "1", "--warmup", "0" }
    os.remove(script)
    assert.equal(130, code)
    assert.matches("luapool: interrupted", err)
    assert.not_matches("bench: case 'a' failed", err)
  end)
end)

describe("bench machine description", function()
  it("reads the machine", function()
    local m = bench.machine()
    assert.equal(require("luapool").info().luapool, m.luapool)
    assert.equal("string", type(m.cpu_model))
    assert.equal("integer", math.type(m.cpus))
    assert.is_true(m.cpus >= 1)
    assert.equal("integer", math.type(m.memory_kb))
    assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%dZ$", m.date)
    assert.equal("number", type(m.loadavg))
    assert.equal("number", type(bench.loadavg()))
  end)

  it("describes one in a line", function()
    assert.equal("CPU X, 2 cpus; 1.00 GiB RAM; Linux; luapool 0.1.0, Lua 5.4.4, libcurl 7.88.1; load 0.50",
      bench.describe_machine { cpu_model = "CPU X", cpus = 2, memory_kb = 1024 * 1024, os = "Linux",
                               luapool = "0.1.0", lua = "Lua 5.4.4", curl = "7.88.1", loadavg = 0.5 })
    assert.equal("unknown CPU, ? cpus", bench.describe_machine {})
  end)
end)

describe("a bench suite, in detail", function()
  local function quiet(name)
    local t, text = 0, {}
    local suite = bench.suite { name = name or "s", clock = function() return t end, progress = false,
                                output = function(s) text[#text + 1] = s end }
    return suite, function(dt) t = t + dt end, text
  end

  it("--filter keeps the matching cases and the baseline they need", function()
    local suite, tick = quiet()
    suite:case { name = "base", group = "g", baseline = "base", body = function() tick(4) end }
    suite:case { name = "fast x2", group = "g", body = function() tick(1) end }
    suite:case { name = "slow x1", group = "g", body = function() tick(2) end }
    suite:case { name = "other x2", group = "h", body = function() tick(3) end }
    suite:run { "--runs", "1", "--warmup", "0", "--filter", "fast" }
    local names = {}
    for _, r in ipairs(suite.results) do names[#names + 1] = r.name end
    assert.same({ "base", "fast x2" }, names)
    assert.equal(0.25, suite:result("fast x2").ratio)
    assert.is_nil(suite:result("slow x1"))
  end)

  it("expands a product over named axes, with fixed params and a filter", function()
    local suite = quiet()
    local made = suite:product {
      axes = { b = { 1, 2 }, a = { "x", "y" } }, fixed = { k = 9 },
      filter = function(p) return not (p.a == "y" and p.b == 2) end,
      name = "{a}{b} {nope}", group = function(p) return "g" .. p.a end,
      units = function(p) return p.b * 10 end, body = function() end,
    }
    local got = {}
    for _, c in ipairs(made) do got[#got + 1] = { c.name, c.group, c.units } end
    assert.same({ { "x1 {nope}", "gx", 10 }, { "x2 {nope}", "gx", 20 }, { "y1 {nope}", "gy", 10 } }, got)
    assert.same({ a = "x", b = 1, k = 9 }, made[1].params)
    made = suite:product { axes = { { "n", { 3 } } }, name = function(p) return "n=" .. p.n end, body = print }
    assert.equal("n=3", made[1].name)
  end)

  it("checks what it is given", function()
    local suite = quiet()
    assert.equal("bench.suite: name (a string) expected", helper.error_of(bench.suite, {}))
    assert.equal("suite:case: name (a string) expected", helper.error_of(suite.case, suite, { body = print }))
    assert.equal("suite:case 'a': body (a function) expected", helper.error_of(suite.case, suite, { name = "a" }))
    assert.equal("suite:case 'a': units must be a positive number",
      helper.error_of(suite.case, suite, { name = "a", body = print, units = 0 }))
    suite:case { name = "a", body = print }
    assert.equal("suite:case: duplicate case name 'a'",
      helper.error_of(suite.case, suite, { name = "a", body = print }))
    assert.equal("suite:product: axes expected", helper.error_of(suite.product, suite, { name = "x" }))
    assert.equal("suite:table: run the suite first", helper.error_of(suite.table, suite))
    assert.equal("suite:report: run the suite first", helper.error_of(suite.report, suite))
  end)

  it("says which case failed or lacks its baseline", function()
    local suite = quiet()
    suite:case { name = "a", body = function() error("boom", 0) end }
    assert.equal("bench: case 'a' failed: boom", helper.error_of(suite.run, suite, { "--runs", "1" }))
    suite = quiet()
    suite:case { name = "a", baseline = "zz", body = print }
    assert.equal("bench: case 'a': no baseline case 'zz' in group 'main'",
      helper.error_of(suite.run, suite, { "--runs", "1" }))
  end)

  it("runs setup and teardown around every run, untimed, and prints its notes", function()
    local suite, tick, text = quiet("notes")
    local log = {}
    suite:case {
      name = "a", params = { p = 1 },
      setup = function(params) tick(100); log[#log + 1] = "setup"; return { p = params.p } end,
      body = function(state, params) tick(1); log[#log + 1] = "body " .. state.p .. params.p end,
      teardown = function(state) tick(100); log[#log + 1] = "teardown " .. state.p end,
    }
    suite:note("a caveat")
    suite:run { "--runs", "2", "--warmup", "1" }
    assert.same({ "setup", "body 11", "teardown 1", "setup", "body 11", "teardown 1",
                  "setup", "body 11", "teardown 1" }, log)
    assert.same({ 1, 1 }, suite:result("a").runs)
    text = table.concat(text)
    assert.matches("^suite: notes\nmachine: ", text)
    assert.matches("\nruns: 2 timed %(%+1 warm%-up%) per case, interleaved by group\n", text)
    assert.matches("\na caveat\n$", text)
  end)

  it("charts ratios and rates, and says why it cannot", function()
    local suite, tick = quiet()
    assert.same({ nil, "svg: run the suite first" }, { suite:svg_text { x = "w" } })
    suite:case { name = "base", baseline = "base", body = function() tick(4) end }
    suite:product { axes = { { "w", { 1, 2, 4 } } }, name = "x{w}", units = 8,
                    body = function(_, p) tick(4 / p.w) end }
    suite:run { "--runs", "1", "--warmup", "0" }
    assert.same({ nil, "svg: option x (a parameter name) expected" }, { suite:svg_text {} })
    assert.same({ nil, "svg: no case has a numeric parameter 'nothing'" }, { suite:svg_text { x = "nothing" } })
    assert.equal("svg: unknown y 'bogus'", helper.error_of(suite.svg_text, suite, { x = "w", y = "bogus" }))
    local svg = assert(suite:svg_text { x = "w", y = "ratio", log_y = true, caption = "cap" })
    assert.equal(1, count(svg, "<polyline "))
    assert.matches("w = 4, 0%.25x</title>", svg)
    assert.matches(">cap</text>", svg)
    svg = assert(suite:svg_text { x = "w", y = "rate",
                                  lines = { { label = "ideal", fn = function(w) return 2 * w end } } })
    assert.matches("w = 4, 8%.00</title>", svg)
    assert.matches(">ideal</text>", svg)
    assert.equal(2, count(svg, 'stroke%-dasharray="2 3"')) -- the curve and its legend
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
    assert.matches("iopool 1 loop c=100 http%.get %(coroutine%)", out)
    assert.matches("iopool 2 loops 1000 in flight fetch_length", out)
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
    assert.matches("luapool iopool 2 loops c=100, 20k", out)
    assert.matches("luapool iopool submit%+result x2 loops", out)
  end)
end)

-- The HTTP benchmarks' floor (scripts/bench/http_floor.c), beside luapool.
describe("luapool-http-floor", function()
  local floor = (helper.bin:match("^(.*)/[^/]*$") or ".") .. "/luapool-http-floor"
  local function run(...)
    local words = { helper.shell_quote(floor) }
    for _, a in ipairs { ... } do words[#words + 1] = helper.shell_quote(tostring(a)) end
    local p = io.popen(table.concat(words, " ") .. " 2>&1")
    local out = p:read("a")
    local _, _, code = p:close()
    return out, code
  end

  it("makes its requests, at once or kept alive, and says how many and how", function()
    local srv = helper.fixture()
    local port = srv.base:match(":(%d+)$")
    local many, c1 = run("many", "127.0.0.1", port, "/sleep?s=0.01", 50, 2)
    local chain, c2 = run("chain", "127.0.0.1", port, "/bytes?n=100", 60, 7, 2)
    local chunked, c3 = run("chain", "127.0.0.1", port, "/slowbody?chunks=3", 4, 2)
    local missing, c4 = run("chain", "127.0.0.1", port, "/status/404", 1, 1)
    local closing, c5 = run("chain", "127.0.0.1", port, "/close", 4, 1)
    srv:stop()
    assert.are.same({ 0, 0, 0, 1, 1 }, { c1, c2, c3, c4, c5 })
    assert.matches("^http_floor: many 50 requests at once on 2 thread%(s%) in [%d.]+ s\n$", many)
    assert.matches("^http_floor: chain 60 requests over 7 connection%(s%) on 2 thread%(s%) in [%d.]+ s\n$",
      chain)
    assert.matches("^http_floor: chain 4 requests over 2 connection%(s%) on 1 thread%(s%) in [%d.]+ s\n$",
      chunked)
    assert.are.equal("http_floor: an answer that is not a 200: HTTP/1.1 404 Not Found\n", missing)
    assert.are.equal("http_floor: the server closes its connections (Connection: close): chain needs keep-alive\n",
      closing)
  end)

  it("talks to loopback only and refuses bad arguments, naming them", function()
    local cases = {
      { { "many", "10.0.0.5", 80, "/", 1, 1 },
        "http_floor: ADDR must be a loopback IPv4 address (127.x.y.z), got '10.0.0.5'\n" },
      { { "many", "5", 80, "/", 1, 1 }, "http_floor: ADDR must be a loopback IPv4 address (127.x.y.z), got '5'\n" },
      { { "many", "127.0.0.1", 0, "/", 1, 1 }, "http_floor: PORT must be an integer in 1..65535, got '0'\n" },
      { { "many", "127.0.0.1", 80, "x", 1, 1 },
        "http_floor: PATH must start with '/' and hold no space or line break, got 'x'\n" },
      { { "chain", "127.0.0.1", 80, "/", 10, 0 }, "http_floor: C must be an integer in 1..100000, got '0'\n" },
      { { "walk", "127.0.0.1", 80, "/", 1, 1 },
        "http_floor: usage: http_floor many ADDR PORT PATH N T | chain ADDR PORT PATH N C [T] (see the head of "
        .. "http_floor.c)\n" },
    }
    for _, c in ipairs(cases) do
      local out, code = run(table.unpack(c[1]))
      assert.are.same({ 2, c[2] }, { code, out })
    end
  end)
end)
