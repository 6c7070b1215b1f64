-- luapool.bench.machine: what the numbers were measured on (CPU, memory,
-- versions, load) and this process's peak resident set.
local luapool = rawget(_G, "luapool") or package.loaded.luapool or require "luapool"
local format = require "luapool.bench.format"
local pairs, pcall, tonumber, tostring, type = pairs, pcall, tonumber, tostring, type
local io, math, os = io, math, os
local concat = table.concat

-- No globals from here on: reading one is an error at run time (_ENV is
-- nil) and for luacheck (std none), so a misspelt name cannot pass unseen.
local _ENV = nil -- luacheck: ignore 211/_ENV
-- luacheck: std none

local M = {}

local function readfile(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("a")
  f:close()
  return s
end

-- luapool.info() plus the CPU model, memory and the date (UTC).
function M.machine()
  local m = {}
  local ok, info = pcall(luapool.info)
  if ok and type(info) == "table" then
    for k, v in pairs(info) do m[k] = v end
  end
  m.cpus = m.cpus or (luapool.cpu_count and luapool.cpu_count())
  local cpuinfo = readfile("/proc/cpuinfo") or ""
  m.cpu_model = cpuinfo:match("model name%s*:%s*([^\n]-)%s*\n")
    or cpuinfo:match("Model%s*:%s*([^\n]-)%s*\n") or "unknown"
  local mem = (readfile("/proc/meminfo") or ""):match("MemTotal:%s*(%d+)")
  m.memory_kb = mem and math.tointeger(tonumber(mem)) or nil
  m.date = os.date("!%Y-%m-%dT%H:%M:%SZ")
  m.loadavg = M.loadavg()
  return m
end

-- The 1-minute load average, or nil.
function M.loadavg()
  local l = (readfile("/proc/loadavg") or ""):match("^(%S+)")
  return l and tonumber(l)
end

function M.describe_machine(m)
  local parts = {}
  parts[#parts + 1] = ("%s, %s cpus"):format(m.cpu_model or "unknown CPU", tostring(m.cpus or "?"))
  if m.memory_kb then parts[#parts + 1] = format.format_kb(m.memory_kb) .. " RAM" end
  if m.os then parts[#parts + 1] = m.os end
  local soft = {}
  if m.luapool then soft[#soft + 1] = "luapool " .. m.luapool end
  if m.lua then soft[#soft + 1] = m.lua end
  if m.curl then soft[#soft + 1] = "libcurl " .. m.curl end
  if #soft > 0 then parts[#parts + 1] = concat(soft, ", ") end
  if m.loadavg then parts[#parts + 1] = ("load %.2f"):format(m.loadavg) end
  return concat(parts, "; ")
end

-- Peak RSS: resets VmHWM to the current RSS (through /proc/self/clear_refs);
-- false when the kernel does not let us, and then the runner reports "-".
function M.reset_hwm()
  local f = io.open("/proc/self/clear_refs", "w")
  if not f then return false end
  local ok = f:write("5")
  local closed = f:close()
  return ok ~= nil and closed ~= nil
end

-- This process's peak resident set (VmHWM) in KiB, or nil.
function M.read_hwm()
  local kb = (readfile("/proc/self/status") or ""):match("VmHWM:%s*(%d+)%s*kB")
  return kb and math.tointeger(tonumber(kb)) or nil
end

return M
