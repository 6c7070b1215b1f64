-- luapool.bench.json: JSON text of Lua values (the reports' --json) and CSV
-- fields (--csv).
local error, getmetatable, ipairs, next, pairs = error, getmetatable, ipairs, next, pairs
local setmetatable, tonumber, tostring, type = setmetatable, tonumber, tostring, type
local math = math
local huge = math.huge
local concat, sort = table.concat, table.sort

-- No globals from here on: reading one is an error at run time (_ENV is
-- nil) and for luacheck (std none), so a misspelt name cannot pass unseen.
local _ENV = nil -- luacheck: ignore 211/_ENV
-- luacheck: std none

local M = {}

-- JSON null, for values that must appear as null.
M.null = setmetatable({}, { __name = "json.null", __tostring = function() return "null" end })

local ESC = { ['"'] = '\\"', ['\\'] = '\\\\', ['\b'] = '\\b', ['\f'] = '\\f',
              ['\n'] = '\\n', ['\r'] = '\\r', ['\t'] = '\\t' }
local function json_string(s)
  return '"' .. s:gsub('[%c"\\]', function(c)
    return ESC[c] or ("\\u%04x"):format(c:byte())
  end) .. '"'
end

local function is_array(t)
  local n = #t
  if n == 0 then return next(t) == nil and getmetatable(t) == M.array_mt end
  local count = 0
  for k in pairs(t) do
    if math.type(k) ~= "integer" or k < 1 or k > n then return false end
    count = count + 1
  end
  return count == n
end

-- Marks a table as a JSON array even when it is empty.
M.array_mt = { __name = "json.array" }
function M.array(t) return setmetatable(t or {}, M.array_mt) end

local function encode(v, out, indent, depth)
  local tv = type(v)
  if v == nil or v == M.null then out[#out + 1] = "null"
  elseif tv == "boolean" then out[#out + 1] = tostring(v)
  elseif tv == "number" then
    if v ~= v or v == huge or v == -huge then out[#out + 1] = "null"
    elseif math.type(v) == "integer" then out[#out + 1] = ("%d"):format(v)
    else
      local s = ("%.17g"):format(v)
      local short = ("%.15g"):format(v)
      if tonumber(short) == v then s = short end
      out[#out + 1] = s
    end
  elseif tv == "string" then out[#out + 1] = json_string(v)
  elseif tv == "table" then
    local pad = indent and ("\n" .. (" "):rep(indent * (depth + 1))) or ""
    local close = indent and ("\n" .. (" "):rep(indent * depth)) or ""
    local colon = indent and ": " or ":"
    if is_array(v) then
      if #v == 0 then out[#out + 1] = "[]" return end
      -- short arrays of scalars stay on one line
      local flat = true
      for i = 1, #v do if type(v[i]) == "table" and v[i] ~= M.null then flat = false end end
      out[#out + 1] = "["
      for i = 1, #v do
        if i > 1 then out[#out + 1] = flat and (indent and ", " or ",") or "," end
        if not flat then out[#out + 1] = pad end
        encode(v[i], out, indent, depth + 1)
      end
      out[#out + 1] = flat and "]" or (close .. "]")
    else
      local keys = {}
      for k in pairs(v) do
        if type(k) ~= "string" and math.type(k) ~= "integer" then
          error("json: cannot encode a key of type " .. type(k))
        end
        keys[#keys + 1] = k
      end
      sort(keys, function(a, b)
        if type(a) == type(b) then return a < b end
        return type(a) == "number"
      end)
      if #keys == 0 then out[#out + 1] = "{}" return end
      out[#out + 1] = "{"
      for i, k in ipairs(keys) do
        if i > 1 then out[#out + 1] = "," end
        out[#out + 1] = pad
        out[#out + 1] = json_string(tostring(k))
        out[#out + 1] = colon
        encode(v[k], out, indent, depth + 1)
      end
      out[#out + 1] = close .. "}"
    end
  else
    error("json: cannot encode a " .. tv)
  end
end

-- JSON text of a value (tables with keys 1..n are arrays, other tables
-- objects with sorted keys; M.null is null).  indent: spaces per level.
function M.json(v, indent)
  local out = {}
  encode(v, out, indent, 0)
  return concat(out)
end

function M.csv_field(v)
  if v == nil or v == M.null then return "" end
  local s = tostring(v)
  if math.type(v) == "float" then s = ("%.9g"):format(v) end
  if s:find('[",\r\n]') then s = '"' .. s:gsub('"', '""') .. '"' end
  return s
end

return M
