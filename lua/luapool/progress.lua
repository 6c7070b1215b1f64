-- Progress reporting for long jobs, on stderr and never on stdout.
--
-- On a terminal the line is redrawn in place (at most ten times a second);
-- elsewhere (a pipe, a log file) a plain line is written every few seconds
-- and once at the end, so logs stay readable.
--
--   local bar = progress.new { label = "map", total = 1000 }
--   bar:update(done)   -- items done so far
--   bar:finish()       -- final line; idempotent
--
-- A bar is a to-be-closed value whose closing finishes it: `local bar
-- <close> = progress.new {...}` ends the bar's line on every way out of
-- the scope, so an error (a task error, Ctrl-C) is not glued to the bar.
--
-- Settings, for tests and special outputs: label (string), total
-- (non-negative integer, or none), output (function receiving the text),
-- tty (boolean: redraw in place or not), interval (seconds between plain
-- lines), now (clock function, returning seconds); any other key, or a
-- value of another type, is refused.
--
-- Compiled into luapool; also available as require "luapool.progress".
local luapool, prim = ...

local M = {}

local function clock(s)
  s = math.floor(s + 0.5)
  local h, m = s // 3600, s // 60 % 60
  if h > 0 then return ("%d:%02d:%02d"):format(h, m, s % 60) end
  return ("%d:%02d"):format(m, s % 60)
end

-- The text of one report (no line ending).
function M.render(label, done, total, elapsed, width)
  local rate = elapsed > 0 and done / elapsed or 0
  local parts = {}
  if total then
    local frac = total > 0 and done / total or 1
    if width then
      local filled = math.floor(frac * width + 0.5)
      parts[#parts + 1] = "[" .. ("#"):rep(filled) .. ("-"):rep(width - filled) .. "]"
    end
    parts[#parts + 1] = ("%d/%d"):format(done, total)
    parts[#parts + 1] = ("%.1f%%"):format(frac * 100)
  else
    parts[#parts + 1] = ("%d done"):format(done)
  end
  parts[#parts + 1] = ("%.1f/s"):format(rate)
  parts[#parts + 1] = "elapsed " .. clock(elapsed)
  if total and rate > 0 and done < total then
    parts[#parts + 1] = "ETA " .. clock((total - done) / rate)
  end
  return label .. ": " .. table.concat(parts, "  ")
end

local Bar = {}
Bar.__index = Bar

-- What a setting takes: a check of its value and the words for it.  A
-- function setting may be any callable (a table with __call).
local function is_callable(v)
  if type(v) == "function" then return true end
  local mt = getmetatable(v)
  return type(mt) == "table" and rawget(mt, "__call") ~= nil
end
local SETTINGS = {
  label = { function(v) return type(v) == "string" end, "string" },
  total = { function(v) return math.type(v) == "integer" and v >= 0 end, "non-negative integer" },
  output = { is_callable, "function" },
  tty = { function(v) return type(v) == "boolean" end, "boolean" },
  interval = { function(v) return type(v) == "number" and v >= 0 end, "non-negative number" },
  now = { is_callable, "function" },
}

local function what(v)
  if type(v) == "number" then return tostring(v) end
  return type(v)
end

-- Settings are checked here, as map's progress option checks them: a
-- misspelt one (intervall) was ignored, and a wrong type failed later in
-- the bar's arithmetic, inside this file.
local function check_settings(s)
  if type(s) ~= "table" then
    error(("bad argument #1 to 'new' (table of settings expected, got %s)"):format(type(s)), 3)
  end
  for k, v in pairs(s) do
    local rule = SETTINGS[k]
    if not rule then error(("bad argument #1 to 'new' (unknown setting '%s')"):format(tostring(k)), 3) end
    if not rule[1](v) then
      error(("bad argument #1 to 'new' (setting '%s': %s expected, got %s)"):format(k, rule[2], what(v)), 3)
    end
  end
end

-- A clock the caller gave, checked at each reading: what it returns is
-- known only then.
local function checked(now)
  return function()
    local t = now()
    if type(t) ~= "number" then
      error(("progress: setting 'now' must return a number, got %s"):format(type(t)), 3)
    end
    return t
  end
end

function M.new(settings)
  local s = settings or {}
  check_settings(s)
  local tty = s.tty
  if tty == nil then tty = prim.isatty(2) end
  local now = s.now and checked(s.now) or luapool.now
  local self = setmetatable({
    label = s.label or "progress", total = s.total, tty = tty, now = now,
    output = s.output or function(text) io.stderr:write(text) io.stderr:flush() end,
    interval = s.interval or (tty and 0.1 or 5), start = now(), last = nil,
    done = 0, finished = false, width = 0,
  }, Bar)
  return self
end

function Bar:emit(final)
  local elapsed = self.now() - self.start
  local text = M.render(self.label, self.done, self.total, elapsed, self.tty and 30 or nil)
  if self.tty then
    -- pad over a longer previous line, then return to the line's start
    local pad = self.width > #text and (" "):rep(self.width - #text) or ""
    self.width = #text
    self.output("\r" .. text .. pad .. (final and "\n" or ""))
  else
    self.output(text .. "\n")
  end
  self.last = self.now()
end

function Bar:update(done)
  if type(done) ~= "number" then
    error(("bad argument #1 to 'update' (number expected, got %s)"):format(type(done)), 2)
  end
  if self.finished then return end
  self.done = done
  local t = self.now()
  if self.last == nil and not self.tty then self.last = self.start end -- plain: a line per interval
  if self.last == nil or t - self.last >= self.interval then self:emit(false) end
end

function Bar:finish()
  if self.finished then return end
  self.finished = true
  self:emit(true)
end

function Bar.__close(self) self:finish() end

return M
