-- luapool.bench.cli: a suite's command line (the standard options every
-- suite takes, the suite's own, the usage text).
local ipairs, tonumber, tostring = ipairs, tonumber, tostring
local math = math
local concat = table.concat

-- No globals from here on: reading one is an error at run time (_ENV is
-- nil) and for luacheck (std none), so a misspelt name cannot pass unseen.
local _ENV = nil -- luacheck: ignore 211/_ENV
-- luacheck: std none

local M = {}

local STANDARD_OPTIONS = {
  { "runs", "N", "integer", "timed rounds per case (default %s)" },
  { "warmup", "N", "integer0", "untimed rounds first (default %s)" },
  { "json", "FILE", "string", "write every run and the summary as JSON" },
  { "csv", "FILE", "string", "write the summary as CSV, one row per case" },
  { "svg", "FILE", "string", "write the suite's chart(s) as SVG ({chart} in FILE: the chart's name)" },
  { "quick", nil, "flag", "tiny sizes: a smoke test, not a measurement" },
  { "filter", "PATTERN", "string", "run only the cases whose group or name contains PATTERN (a Lua pattern)" },
}

local function option_list(extra)
  local list = {}
  for _, o in ipairs(STANDARD_OPTIONS) do list[#list + 1] = o end
  for _, o in ipairs(extra or {}) do
    list[#list + 1] = { o[1] or o.name, o[2] or o.arg, o[3] or o.type or "string", o[4] or o.help or "" }
  end
  return list
end

-- The usage text.  defaults: {runs =, warmup =}.
function M.usage(script, extra, defaults)
  defaults = defaults or {}
  local lines, short = {}, {}
  for _, o in ipairs(option_list(extra)) do
    local flag = "--" .. o[1] .. (o[2] and (" " .. o[2]) or "")
    short[#short + 1] = "[" .. flag .. "]"
    local help = o[4]:gsub("%%s", tostring(defaults[o[1]] or "?"))
    lines[#lines + 1] = ("  %-16s %s"):format(flag, help)
  end
  return ("usage: luapool %s %s\n%s\n"):format(script or "SUITE.lua", concat(short, " "), concat(lines, "\n"))
end

-- Parses a suite's command line.  Returns a table of options (runs,
-- warmup, json, csv, svg, quick, help, and the extra ones by name) or nil
-- and a message.  extra: list of {name, ARG or nil, type, help} with type
-- "integer", "integer0" (>= 0), "number", "string" or "flag".
function M.parse_args(args, extra)
  local spec = {}
  for _, o in ipairs(option_list(extra)) do spec[o[1]] = o end
  local opts = {}
  local i = 1
  while i <= #args do
    local a = args[i]
    if a == "-h" or a == "--help" then
      opts.help = true
    else
      local name, inline = tostring(a):match("^%-%-([%w%-_]+)=(.*)$")
      if not name then name = tostring(a):match("^%-%-([%w%-_]+)$") end
      local o = name and spec[name]
      if not o then
        if name then return nil, "unknown option '" .. a .. "'" end
        return nil, "unexpected argument '" .. tostring(a) .. "'"
      end
      if o[3] == "flag" then
        if inline then return nil, "option --" .. name .. " takes no value" end
        opts[name] = true
      else
        local v = inline
        if v == nil then
          i = i + 1
          v = args[i]
        end
        if v == nil then return nil, "option --" .. name .. " needs " .. (o[2] or "a value") end
        if o[3] == "integer" or o[3] == "integer0" then
          local n = math.tointeger(tonumber(v))
          local lo = o[3] == "integer" and 1 or 0
          if not n or n < lo then
            return nil, ("option --%s needs an integer >= %d, got '%s'"):format(name, lo, v)
          end
          v = n
        elseif o[3] == "number" then
          local n = tonumber(v)
          if not n then return nil, ("option --%s needs a number, got '%s'"):format(name, v) end
          v = n
        end
        opts[name] = v
      end
    end
    i = i + 1
  end
  return opts
end

return M
