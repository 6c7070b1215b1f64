-- luapool.bench.svg: a run suite's results as an SVG line chart (--svg and
-- the suite's charts).
local format = require "luapool.bench.format"
local format_count, format_time = format.format_count, format.format_time
local error, ipairs, pairs, tonumber, tostring, type = error, ipairs, pairs, tonumber, tostring, type
local math, utf8 = math, utf8
local floor, huge = math.floor, math.huge
local concat, sort = table.concat, table.sort

-- No globals from here on: reading one is an error at run time (_ENV is
-- nil) and for luacheck (std none), so a misspelt name cannot pass unseen.
local _ENV = nil -- luacheck: ignore 211/_ENV
-- luacheck: std none

local M = {}

local PALETTE = { "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
                  "#17becf", "#7f7f7f", "#bcbd22" }

local function xml(s)
  return (tostring(s):gsub("[&<>\"]", { ["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;", ['"'] = "&quot;" }))
end

local function num(v) return ("%.1f"):format(v) end

-- Series i's marker at (x, y): circle, square, diamond, triangle, in turn,
-- so lines that overlap stay distinguishable.
local function marker(i, x, y, color, inner)
  local shape = (i - 1) % 4
  local open = inner ~= "" and (">" .. inner) or "/>"
  local close = inner ~= "" and "</%s>" or ""
  if shape == 0 then
    return ('<circle cx="%s" cy="%s" r="4" fill="%s"'):format(num(x), num(y), color) .. open
      .. close:format("circle")
  elseif shape == 1 then
    return ('<rect x="%s" y="%s" width="7" height="7" fill="%s"'):format(num(x - 3.5), num(y - 3.5), color)
      .. open .. close:format("rect")
  end
  local pts
  if shape == 2 then
    pts = { x, y - 5, x + 5, y, x, y + 5, x - 5, y }
  else
    pts = { x, y - 5, x + 5, y + 4, x - 5, y + 4 }
  end
  local s = {}
  for k = 1, #pts, 2 do s[#s + 1] = num(pts[k]) .. "," .. num(pts[k + 1]) end
  return ('<polygon points="%s" fill="%s"'):format(concat(s, " "), color) .. open .. close:format("polygon")
end

-- Ticks at 1, 2, 5 x 10^k covering [lo, hi] (about n of them).
local function nice_ticks(lo, hi, n)
  if hi <= lo then hi = lo + (lo == 0 and 1 or math.abs(lo)) end
  local raw = (hi - lo) / (n or 5)
  local mag = 10 ^ floor(math.log(raw, 10))
  local step = mag
  for _, m in ipairs { 1, 2, 2.5, 5, 10 } do
    if raw <= m * mag then step = m * mag break end
  end
  local first = floor(lo / step + 1e-9) * step
  local last = math.ceil(hi / step - 1e-9) * step
  local ticks = {}
  for k = 0, floor((last - first) / step + 0.5) do ticks[#ticks + 1] = first + k * step end
  return ticks, first, last
end

-- Ticks for a log axis: powers of ten (with 2 and 5 when few decades).
local function log_ticks(lo, hi)
  local ticks = {}
  local e0, e1 = floor(math.log(lo, 10) + 1e-9), math.ceil(math.log(hi, 10) - 1e-9)
  local mult = (e1 - e0 <= 2) and { 1, 2, 5 } or { 1 }
  for e = e0, e1 do
    for _, m in ipairs(mult) do
      local v = m * 10 ^ e
      if v >= lo * (1 - 1e-9) and v <= hi * (1 + 1e-9) then ticks[#ticks + 1] = v end
    end
  end
  return ticks
end

local function y_value(r, which)
  if which == "median" or which == nil then return r.median end
  if which == "min" then return r.min end
  if which == "per_unit" then return r.per_unit end
  if which == "ratio" then return r.ratio end
  if which == "rate" then return r.units and r.units / r.median end
  error("svg: unknown y '" .. tostring(which) .. "'")
end

-- Writes an SVG line chart of the results: y (median wall time by default;
-- "min", "per_unit", "ratio" or "rate") against the numeric parameter x,
-- one line with markers per value of the parameter `series` (or per value
-- of series(result) when a function).  Options: group (a group name or a
-- list of them: only their cases), title, x_label, y_label, log_x, log_y,
-- width, height, reference (default true: the cases of those groups that
-- lack x, such as a sequential baseline, become dashed horizontal lines),
-- lines (a list of {label =, fn = function(x) -> y}: dotted curves such as
-- an ideal, sampled at the x values of the data).
-- Returns the SVG text, or nil and a message.  A method of a suite:
-- suite:svg_text(o), after suite:run(); suite:svg(file, o) writes it.
function M.text(self, o)
  o = o or {}
  local results = self.results
  if not results then return nil, "svg: run the suite first" end
  if not o.x then return nil, "svg: option x (a parameter name) expected" end
  local groups
  if type(o.group) == "string" then groups = { [o.group] = true }
  elseif type(o.group) == "table" then
    groups = {}
    for _, g in ipairs(o.group) do groups[g] = true end
  end
  local function label_of(r)
    if type(o.series) == "function" then return tostring(o.series(r)) end
    if o.series then return tostring(r.params[o.series]) end
    return o.label or "median"
  end
  local series, order, refs, ref_color, ngroups = {}, {}, {}, {}, 0
  for _, r in ipairs(results) do
    if not groups or groups[r.group] then
      local y = y_value(r, o.y)
      local x = r.params[o.x]
      if type(x) == "number" and type(y) == "number" then
        local key = label_of(r)
        if not series[key] then
          series[key] = {}
          order[#order + 1] = key
          -- a reference line takes the colour of the first series of its group
          if not ref_color[r.group] then
            ref_color[r.group] = PALETTE[(#order - 1) % #PALETTE + 1]
            ngroups = ngroups + 1
          end
        end
        local pts = series[key]
        pts[#pts + 1] = { x, y }
      elseif x == nil and type(y) == "number" and o.reference ~= false then
        refs[#refs + 1] = { r.name, y, r.group }
      end
    end
  end
  if #order == 0 then return nil, "svg: no case has a numeric parameter '" .. tostring(o.x) .. "'" end
  for _, ref in ipairs(refs) do
    ref[3] = (ngroups > 1 and ref_color[ref[3]]) or "#555555"
  end
  for _, k in ipairs(order) do sort(series[k], function(a, b) return a[1] < b[1] end) end

  -- the legend's width follows its longest label (about 6.6 px a character)
  local longest = 0
  for _, k in ipairs(order) do longest = math.max(longest, utf8.len(k) or #k) end
  for _, ref in ipairs(refs) do longest = math.max(longest, #ref[1] + 11) end
  for _, l in ipairs(o.lines or {}) do longest = math.max(longest, #(l.label or "")) end
  local left, right, top, bottom = 78, math.max(160, 48 + math.ceil(6.6 * longest)), 44, 58
  local W, H = o.width or (left + 480 + right), o.height or 460
  local pw, ph = W - left - right, H - top - bottom

  -- x scale
  local xmin, xmax, ymin, ymax = huge, -huge, huge, -huge
  local xs = {}
  for _, k in ipairs(order) do
    for _, p in ipairs(series[k]) do
      xmin, xmax = math.min(xmin, p[1]), math.max(xmax, p[1])
      ymin, ymax = math.min(ymin, p[2]), math.max(ymax, p[2])
      xs[p[1]] = true
    end
  end
  for _, ref in ipairs(refs) do ymin, ymax = math.min(ymin, ref[2]), math.max(ymax, ref[2]) end
  -- extra curves (o.lines: {label =, fn = function(x) -> y}), sampled at the data's x values
  local curves = {}
  do
    local distinct = {}
    for v in pairs(xs) do distinct[#distinct + 1] = v end
    sort(distinct)
    for _, l in ipairs(o.lines or {}) do
      local pts = {}
      for _, x in ipairs(distinct) do
        local y = l.fn(x)
        if type(y) == "number" and y == y then
          pts[#pts + 1] = { x, y }
          ymin, ymax = math.min(ymin, y), math.max(ymax, y)
        end
      end
      if #pts > 0 then curves[#curves + 1] = { label = l.label or "", pts = pts } end
    end
  end
  local log_x = o.log_x and xmin > 0
  local log_y = o.log_y and ymin > 0
  local xticks
  local fx
  if log_x then
    local lo, hi = math.log(xmin), math.log(xmax)
    if hi <= lo then hi = lo + 1 end
    fx = function(v) return left + (math.log(v) - lo) / (hi - lo) * pw end
    local distinct = {}
    for v in pairs(xs) do distinct[#distinct + 1] = v end
    sort(distinct)
    xticks = #distinct <= 12 and distinct or log_ticks(xmin, xmax)
  else
    local t, lo, hi = nice_ticks(math.min(xmin, o.x_zero and 0 or xmin), xmax, 6)
    xticks = t
    fx = function(v) return left + (v - lo) / (hi - lo) * pw end
  end
  local yticks, fy
  if log_y then
    local lo = 10 ^ floor(math.log(ymin, 10))
    local hi = 10 ^ math.ceil(math.log(ymax, 10))
    if hi <= lo then hi = lo * 10 end
    local ll, lh = math.log(lo), math.log(hi)
    fy = function(v) return top + ph - (math.log(v) - ll) / (lh - ll) * ph end
    yticks = log_ticks(lo, hi)
  else
    local t, lo, hi = nice_ticks(0, ymax * 1.05, 5)
    yticks = t
    fy = function(v) return top + ph - (v - lo) / (hi - lo) * ph end
  end
  local which = o.y or "median"
  local function ylabel_text(v)
    if which == "ratio" then return ("%gx"):format(tonumber(("%.3g"):format(v))) end
    if which == "rate" then return format_count(v) end
    return format_time(v)
  end

  local out = {}
  local function add(s) out[#out + 1] = s end
  add(('<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" '
    .. 'font-family="sans-serif" font-size="12">'):format(W, H, W, H))
  local title = o.title or (self.title or self.name)
  add("<title>" .. xml(title) .. "</title>")
  add(('<rect x="0" y="0" width="%d" height="%d" fill="#ffffff"/>'):format(W, H))
  add(('<text x="%s" y="24" font-size="15" font-weight="bold" text-anchor="middle">%s</text>')
    :format(num(left + pw / 2), xml(title)))
  -- grid and ticks
  add('<g stroke="#e5e5e5" stroke-width="1">')
  for _, v in ipairs(yticks) do
    local y = fy(v)
    if y >= top - 0.5 and y <= top + ph + 0.5 then
      add(('<line x1="%d" y1="%s" x2="%d" y2="%s"/>'):format(left, num(y), left + pw, num(y)))
    end
  end
  for _, v in ipairs(xticks) do
    local x = fx(v)
    add(('<line x1="%s" y1="%d" x2="%s" y2="%d"/>'):format(num(x), top, num(x), top + ph))
  end
  add("</g>")
  add(('<g stroke="#333333" stroke-width="1"><line x1="%d" y1="%d" x2="%d" y2="%d"/>'
    .. '<line x1="%d" y1="%d" x2="%d" y2="%d"/></g>'):format(left, top + ph, left + pw, top + ph,
    left, top, left, top + ph))
  add('<g fill="#333333">')
  for _, v in ipairs(yticks) do
    local y = fy(v)
    if y >= top - 0.5 and y <= top + ph + 0.5 then
      add(('<text x="%d" y="%s" text-anchor="end">%s</text>'):format(left - 6, num(y + 4), xml(ylabel_text(v))))
    end
  end
  for _, v in ipairs(xticks) do
    add(('<text x="%s" y="%d" text-anchor="middle">%s</text>'):format(num(fx(v)), top + ph + 18,
      xml(("%g"):format(v))))
  end
  add("</g>")
  add(('<text x="%s" y="%d" text-anchor="middle">%s</text>'):format(num(left + pw / 2), H - 14,
    xml(o.x_label or o.x)))
  add(('<text x="16" y="%s" text-anchor="middle" transform="rotate(-90 16 %s)">%s</text>')
    :format(num(top + ph / 2), num(top + ph / 2),
      xml(o.y_label or (which == "median" and "median wall time" or which))))
  -- extra curves: dotted grey paths
  for _, c in ipairs(curves) do
    local d = {}
    for k, p in ipairs(c.pts) do d[#d + 1] = (k == 1 and "M" or "L") .. num(fx(p[1])) .. " " .. num(fy(p[2])) end
    add(('<path d="%s" fill="none" stroke="#888888" stroke-width="1.5" stroke-dasharray="2 3"/>')
      :format(concat(d, " ")))
  end
  -- reference lines
  for _, ref in ipairs(refs) do
    local y = fy(ref[2])
    add(('<line x1="%d" y1="%s" x2="%d" y2="%s" stroke="%s" stroke-width="1.5" '
      .. 'stroke-dasharray="6 4"/>'):format(left, num(y), left + pw, num(y), ref[3]))
  end
  -- series
  for i, key in ipairs(order) do
    local color = PALETTE[(i - 1) % #PALETTE + 1]
    local pts = {}
    for _, p in ipairs(series[key]) do pts[#pts + 1] = num(fx(p[1])) .. "," .. num(fy(p[2])) end
    add(('<g class="series"><polyline fill="none" stroke="%s" stroke-width="2" points="%s"/>')
      :format(color, concat(pts, " ")))
    for _, p in ipairs(series[key]) do
      add(marker(i, fx(p[1]), fy(p[2]), color,
        ("<title>%s: %s = %g, %s</title>"):format(xml(key), xml(o.x), p[1], xml(ylabel_text(p[2])))))
    end
    add("</g>")
  end
  -- legend
  local lx, ly = left + pw + 16, top + 8
  add('<g class="legend">')
  for i, key in ipairs(order) do
    local color = PALETTE[(i - 1) % #PALETTE + 1]
    local y = ly + (i - 1) * 20
    add(('<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="%s" stroke-width="2"/>'):format(lx, y, lx + 22, y, color))
    add(marker(i, lx + 11, y, color, ""))
    add(('<text x="%d" y="%d">%s</text>'):format(lx + 28, y + 4, xml(key)))
  end
  for j, c in ipairs(curves) do
    local y = ly + (#order + #refs + j - 1) * 20
    add(('<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="#888888" stroke-width="1.5" stroke-dasharray="2 3"/>')
      :format(lx, y, lx + 22, y))
    add(('<text x="%d" y="%d">%s</text>'):format(lx + 28, y + 4, xml(c.label)))
  end
  for j, ref in ipairs(refs) do
    local y = ly + (#order + j - 1) * 20
    add(('<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="%s" stroke-width="1.5" stroke-dasharray="6 4"/>')
      :format(lx, y, lx + 22, y, ref[3]))
    add(('<text x="%d" y="%d">%s (%s)</text>'):format(lx + 28, y + 4, xml(ref[1]), xml(ylabel_text(ref[2]))))
  end
  add("</g>")
  if o.caption then
    add(('<text x="%d" y="%d" font-size="10" fill="#666666">%s</text>'):format(lx, top + ph, xml(o.caption)))
  end
  add("</svg>")
  return concat(out, "\n") .. "\n"
end

return M
