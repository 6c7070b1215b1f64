-- The Lua layer over the C core: map, starmap, imap, as_completed, wait.
--
-- This file is compiled into luapool (the binary and luapool.so), so the
-- module needs no Lua files at run time.  It is called once per Lua state
-- with the module table, the pools' method table, the C primitives and the
-- progress module.  Everything that waits does so in C; everything here
-- is bookkeeping: chunks, windows, ordering, cancellation, progress.
local luapool, methods, prim, progress = ...

local now = luapool.now
local submit_chunk, chunk_into, cancel = prim.submit_chunk, prim.chunk_into, prim.cancel
local new_error, is_future, cq = prim.error, prim.is_future, prim.cq
local error, type, pairs, ipairs, tostring = error, type, pairs, ipairs, tostring
local math_type, math_max, rawlen = math.type, math.max, rawlen

-- Errors about arguments point at the caller of the API function.  Levels
-- count from the function that calls error(): an API function raising
-- itself uses 2, argerror called by it 3, argerror called by a helper of
-- it 4 (map and starmap tail-call map_impl, which thus stands at the API
-- function's level).
local function argerror(n, fname, msg, level)
  error(("bad argument #%d to '%s' (%s)"):format(n, fname, msg), level or 3)
end

local function typename(v)
  local mt = getmetatable(v)
  if type(mt) == "table" and type(mt.__name) == "string" then return mt.__name end
  return type(v)
end

local function check_fn(fn, fname)
  if type(fn) ~= "function" then
    argerror(1, fname, "function or kernel expected, got " .. typename(fn), 4)
  end
end

-- Reads an options table against the names allowed; returns it (or {}).
local function options(opts, n, fname, allowed)
  if opts == nil then return {} end
  if type(opts) ~= "table" then argerror(n, fname, "table expected, got " .. typename(opts), 4) end
  for k in pairs(opts) do
    if not allowed[k] then error(("unknown option '%s' to '%s'"):format(tostring(k), fname), 3) end
  end
  return opts
end

local function opt_int(opts, key, fname)
  local v = opts[key]
  if v ~= nil and (math_type(v) ~= "integer" or v < 1) then
    error(("bad option '%s' to '%s' (positive integer expected, got %s)")
      :format(key, fname, tostring(v)), 3)
  end
  return v
end

local function opt_timeout(v, fname, what)
  if v ~= nil and (type(v) ~= "number" or v < 0 or v ~= v) then
    error(("bad option '%s' to '%s' (non-negative number expected, got %s)")
      :format(what, fname, tostring(v)), 3)
  end
  return v
end

local function opt_positive(v, fname)
  if v ~= nil and (type(v) ~= "number" or v ~= v or v <= 0) then
    error(("bad option 'task_timeout' to '%s' (positive number of seconds expected, got %s)")
      :format(fname, tostring(v)), 3)
  end
  return v
end

-- A progress bar when opts.progress asks for one (true, or a table of
-- settings for progress.new), else a bar that does nothing.
local NO_BAR = { update = function() end, finish = function() end }
local function bar_for(opts, label, total)
  local p = opts.progress
  if not p then return NO_BAR end
  local settings = type(p) == "table" and p or {}
  return progress.new {
    label = settings.label or label, total = total, output = settings.output,
    tty = settings.tty, interval = settings.interval, now = settings.now,
  }
end

-- Items per chunk when the caller gives none.  A process round trip costs
-- tens of microseconds, so process pools batch enough calls to amortize it
-- while keeping about four chunks per worker for balance; thread pools
-- hand out single calls, which spreads latency-bound work (fetches) evenly.
local function auto_chunksize(pool, n)
  if pool.kind ~= "processpool" then return 1 end
  local per = n // (pool.max_workers * 4)
  if per < 1 then return 1 end
  return per > 1024 and 1024 or per
end

local function cancel_from(futures, first)
  for c = first, #futures do cancel(futures[c]) end
end

-- {====== map and starmap

local MAP_OPTS = { chunksize = true, timeout = true, progress = true, task_timeout = true }

local function map_impl(pool, fn, items, opts, star, fname)
  check_fn(fn, fname)
  if type(items) ~= "table" then
    argerror(2, fname, "table expected, got " .. typename(items))
  end
  opts = options(opts, 3, fname, MAP_OPTS)
  local n = rawlen(items)
  local task_timeout = opt_positive(opts.task_timeout, fname)
  -- A deadline is per task: with one, every item is its own task.
  local chunk = opt_int(opts, "chunksize", fname) or
    (task_timeout or pool.task_timeout) and 1 or auto_chunksize(pool, n)
  local timeout = opt_timeout(opts.timeout, fname, "timeout")
  local deadline = timeout and now() + timeout
  local futures = {}
  for lo = 1, n, chunk do
    local hi = lo + chunk - 1
    if hi > n then hi = n end
    local f, err = submit_chunk(pool, fn, items, lo, hi, star, opts.task_timeout)
    if not f then
      cancel_from(futures, 1)
      error((err:gsub("^bad item (#%d+) ", "bad item %1 to '" .. fname .. "' ")), 2)
    end
    futures[#futures + 1] = f
  end
  local bar = bar_for(opts, fname, n)
  local results = {}
  for c, f in ipairs(futures) do
    local lo = (c - 1) * chunk + 1
    local ok, err = chunk_into(f, results, lo, deadline and math_max(0, deadline - now()))
    if ok == nil then
      cancel_from(futures, c)
      bar:finish()
      error(new_error("timeout", ("%s: %d of %d results not ready after %g seconds")
        :format(fname, n - lo + 1, n, timeout)))
    elseif not ok then
      cancel_from(futures, c + 1)
      bar:finish()
      error(err)
    end
    bar:update(lo + prim.chunk_size(f) - 1)
  end
  bar:finish()
  return results
end

function methods.map(pool, fn, items, opts)
  return map_impl(pool, fn, items, opts, false, "map")
end

function methods.starmap(pool, fn, arglists, opts)
  return map_impl(pool, fn, arglists, opts, true, "starmap")
end

-- }======

-- {====== imap: lazy, bounded, ordered or not

local IMAP_OPTS = {
  buffersize = true, ordered = true, chunksize = true, progress = true, task_timeout = true,
}

-- The items of a table (its sequence, as long as it is when imap starts) or
-- of an iterator function (until it returns nil; only its first value).
local function item_source(iterable)
  if type(iterable) == "table" then
    local i, n = 0, rawlen(iterable)
    return function()
      if i >= n then return false end
      i = i + 1
      return true, iterable[i]
    end, n
  end
  return function()
    local v = iterable()
    if v == nil then return false end
    return true, v
  end, nil
end

function methods.imap(pool, fn, iterable, opts)
  check_fn(fn, "imap")
  local kind = type(iterable)
  if kind ~= "table" and kind ~= "function" then
    argerror(2, "imap", "table or iterator function expected, got " .. typename(iterable))
  end
  opts = options(opts, 3, "imap", IMAP_OPTS)
  local chunk = opt_int(opts, "chunksize", "imap") or 1
  local task_timeout = opt_positive(opts.task_timeout, "imap")
  local buffersize = opt_int(opts, "buffersize", "imap") or 2 * pool.max_workers
  local ordered = opts.ordered ~= false
  local next_item, total = item_source(iterable)
  local bar = bar_for(opts, "imap", total)

  -- In flight: chunks as {future, first index, count}, oldest first for the
  -- ordered walk; a completion queue finds finished ones for the unordered.
  local inflight, head, tail, items_in_flight = {}, 1, 0, 0
  local by_future = {}
  local queue = (not ordered) and cq() or nil
  local exhausted, next_index, yielded = false, 1, 0
  local results, rpos, rlen, rfirst = {}, 1, 0, 0
  local closed = false

  local function close()
    if closed then return end
    closed = true
    for i = head, tail do
      local c = inflight[i]
      if c then cancel(c[1]) end
    end
    if queue then queue:close() end
    bar:finish()
  end

  -- Submits chunks until the window is full or the input ends.
  local function fill()
    while not exhausted and items_in_flight < buffersize do
      local args, k = {}, 0
      while k < chunk do
        local ok, v = next_item()
        if not ok then
          exhausted = true
          break
        end
        k = k + 1
        args[k] = v
      end
      if k == 0 then return end
      local f, err = submit_chunk(pool, fn, args, 1, k, false, task_timeout, next_index)
      if not f then
        close()
        error(err, 3)
      end
      tail = tail + 1
      local c = { f, next_index, k }
      inflight[tail] = c
      next_index = next_index + k
      items_in_flight = items_in_flight + k
      if queue then
        by_future[f] = tail
        queue:add(f)
      end
    end
  end

  local function take(slot)
    local c = inflight[slot]
    inflight[slot] = nil
    if queue then by_future[c[1]] = nil end
    while head <= tail and inflight[head] == nil do head = head + 1 end
    local ok, err = chunk_into(c[1], results, 1)
    if not ok then
      close()
      error(err, 0)
    end
    items_in_flight = items_in_flight - c[3]
    rpos, rlen, rfirst = 1, c[3], c[2]
  end

  local function iter()
    if closed then return nil end
    if rpos > rlen then
      fill()
      if head > tail then
        close()
        return nil
      end
      if ordered then
        take(head)
      else
        take(by_future[queue:pop()])
      end
      fill() -- keep the window full while the caller works on this chunk
    end
    local i, v = rfirst + rpos - 1, results[rpos]
    results[rpos] = nil
    rpos = rpos + 1
    yielded = yielded + 1
    bar:update(yielded)
    return i, v
  end

  -- The generic for's closing value: leaving the loop early (break, error,
  -- return) cancels what has not started.
  return iter, nil, nil, setmetatable({}, { __close = close })
end

-- }======

-- {====== as_completed and wait

local function collect(futures, fname)
  if type(futures) ~= "table" then
    argerror(1, fname, "table of futures expected, got " .. typename(futures))
  end
  local q = cq()
  local list = {}
  for i, f in ipairs(futures) do
    if not is_future(f) then
      q:close()
      argerror(1, fname, ("future expected at index %d, got %s"):format(i, typename(f)))
    end
    if q:add(f) then list[#list + 1] = f end
  end
  return q, list
end

function luapool.as_completed(futures, timeout)
  if timeout ~= nil and (type(timeout) ~= "number" or timeout < 0 or timeout ~= timeout) then
    argerror(2, "as_completed", "non-negative number expected, got " .. tostring(timeout))
  end
  local q, list = collect(futures, "as_completed")
  local total, yielded = #list, 0
  local deadline = timeout and now() + timeout
  local function iter()
    local f = q:pop(deadline and math_max(0, deadline - now()))
    if f == false then
      q:close()
      return nil
    elseif f == nil then
      q:close()
      error(new_error("timeout", ("%d (of %d) futures unfinished after %g seconds")
        :format(total - yielded, total, timeout)))
    end
    yielded = yielded + 1
    return f
  end
  return iter, nil, nil, q
end

local RETURN_WHEN = { ALL_COMPLETED = true, FIRST_COMPLETED = true, FIRST_EXCEPTION = true }
local WAIT_OPTS = { timeout = true, return_when = true }

function luapool.wait(futures, opts)
  opts = options(opts, 2, "wait", WAIT_OPTS)
  local timeout = opt_timeout(opts.timeout, "wait", "timeout")
  local when = opts.return_when or "ALL_COMPLETED"
  if not RETURN_WHEN[when] then
    error(("bad option 'return_when' to 'wait' (ALL_COMPLETED, FIRST_COMPLETED or " ..
      "FIRST_EXCEPTION expected, got %s)"):format(tostring(when)), 2)
  end
  local q <close>, list = collect(futures, "wait")
  local deadline = timeout and now() + timeout
  while q:pending() > 0 do
    local f = q:pop(deadline and math_max(0, deadline - now()))
    if not f then break end -- timed out
    if when == "FIRST_COMPLETED" then break end
    if when == "FIRST_EXCEPTION" and not f:cancelled() and f:exception(0) then break end
  end
  -- Whatever is done now is done: futures already finished when wait was
  -- called count for FIRST_COMPLETED too, as in Python.
  local done, not_done = {}, {}
  for _, f in ipairs(list) do
    if f:done() then done[#done + 1] = f else not_done[#not_done + 1] = f end
  end
  return done, not_done
end

-- }======
