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
local chunk_size, is_closing = prim.chunk_size, prim.closing
local new_error, is_future, cq = prim.error, prim.is_future, prim.cq
local error, type, pairs, ipairs, tostring, next = error, type, pairs, ipairs, tostring, next
local getmetatable, setmetatable, table_unpack, rawget = getmetatable, setmetatable, table.unpack, rawget
local math_type, math_max, math_tointeger, math_floor = math.type, math.max, math.tointeger, math.floor
-- A metatable even behind __metatable: any metatable may define __index
-- or __len, and the C side reads tables raw.
local raw_getmetatable = debug and debug.getmetatable or getmetatable
-- The iterator function ipairs returns, to recognize pool:imap(fn, ipairs(t)).
local IPAIRS_ITER = ipairs({})

-- Errors about arguments and misuse point at the caller of the API
-- function.  Levels count as error()'s do, from the function that calls
-- raise: an API function raising itself uses 2, argerror called by it 3
-- (the default), a helper of it calling raise 3 and one calling argerror
-- (or bad_option) 4.  map and starmap tail-call map_impl, which thus
-- stands at the API function's level; imap's iterator stands at the level
-- of the loop's function.
--
-- A caller that tail-calls the API (`return pool:map(fn, t)`) has no frame
-- left: the level then lands on whatever called it, which for a function
-- run by pcall, xpcall or a metamethod is a C function, and error() adds
-- no position at all.  raise goes on up to the nearest Lua function that
-- is running a line and names that line (Lua does the same when the
-- caller's caller is a Lua function), so every such error names a line
-- of the script.  Frames of luapool's own compiled-in Lua files are passed
-- over the same way: a done-callback that tail-calls the API runs under
-- C called from this file (map waiting), and this file's line would tell
-- the script nothing.
local getinfo = debug and debug.getinfo
local function foreign(info)
  return info.currentline <= 0 or info.source:sub(1, 11) == "=[luapool] "
end
local function raise(msg, level)
  if not getinfo then error(msg, level + 1) end
  local l = level + 1 -- the same frame, counted from here
  local info = getinfo(l, "Sl")
  while info and foreign(info) do
    l = l + 1
    info = getinfo(l, "Sl")
  end
  error(msg, info and l or 0)
end

local function argerror(n, fname, msg, level)
  raise(("bad argument #%d to '%s' (%s)"):format(n, fname, msg), level or 3)
end

local function typename(v)
  local mt = getmetatable(v)
  if type(mt) == "table" and type(mt.__name) == "string" then return mt.__name end
  return type(v)
end

-- What a refused value was, for "got ...": a number by its value (2.5,
-- -1, nan), anything else by its type (a string "2" is a string).
local function got(v)
  if type(v) == "number" then return tostring(v) end
  return typename(v)
end

-- self of map, starmap and imap: a pool (pool.map(fn, t), with a dot, is
-- the usual slip).  Read by its metatable's name, as luaL_checkudata does.
local function check_pool(pool, fname)
  if typename(pool) ~= "luapool.pool" then
    raise(("calling '%s' on bad self (luapool.pool expected, got %s%s)"):format(fname, typename(pool),
      type(pool) == "function" and (": write pool:%s(...), with a colon"):format(fname) or ""), 3)
  end
end

local function check_fn(fn, fname)
  if type(fn) ~= "function" then
    argerror(1, fname, "function or kernel expected, got " .. typename(fn), 4)
  end
end

-- What an argument that should be a sequence was, when it is the iterator
-- of an ipairs() or pairs() call: the usual slip, pool:imap(fn, ipairs(t)),
-- which also passes t where the options go.
local function iterator_slip(v, fname, expected)
  if v == IPAIRS_ITER then
    return ("%s expected, got the iterator of an ipairs() call: write pool:%s(fn, t), " ..
      "not pool:%s(fn, ipairs(t))"):format(expected, fname, fname)
  elseif v == next then
    return ("%s expected, got next, the iterator of a pairs() call: write pool:%s(fn, t) " ..
      "(its sequence), not pool:%s(fn, pairs(t))"):format(expected, fname, fname)
  end
end

-- What an argument read as a sequence was, when it is a table with a
-- __call metamethod and no __len: an iterator object, by every sign, that
-- would read as an empty sequence (#t is 0) and so silently yield nothing
-- (helper-52).  The contract reads a table as a sequence and takes only a
-- function as an iterator; a callable table with a __len is a view, read
-- as one.
local function callable_slip(v, fname, expected)
  local mt = type(v) == "table" and raw_getmetatable(v)
  if type(mt) ~= "table" or rawget(mt, "__call") == nil or rawget(mt, "__len") ~= nil then return nil end
  local how = fname == "imap" and "; to iterate it, write pool:imap(fn, function() return t() end)" or
    ", and takes no iterator"
  return ("%s expected, got a callable table with no __len: %s reads a table as a sequence, #t and t[i]%s")
    :format(expected, fname, how)
end

-- Reads an options table (argument n) against the names allowed; returns
-- it (or {}).
local function options(opts, n, fname, allowed)
  if opts == nil then return {} end
  if type(opts) ~= "table" then
    argerror(n, fname, "table expected, got " .. typename(opts), 4)
  end
  for k in pairs(opts) do
    if not allowed[k] then
      if math_type(k) == "integer" then -- a list, not options
        local why = fname == "imap" and
          ": is it the table of an iterator call such as ipairs(t)? imap takes the table itself, " ..
          "pool:imap(fn, t), or a function returning the next item" or ""
        argerror(n, fname, "options table expected, got a table with integer keys" .. why, 4)
      end
      raise(("unknown option '%s' to '%s'"):format(tostring(k), fname), 3)
    end
  end
  return opts
end

-- Option checks follow Lua's own rules for arguments, except that strings
-- are never taken for numbers: an integer option takes an integer or a
-- float with an integral value (2.0), a number of seconds any number in
-- range; each returns the value to use (an integer for integer options).
local function bad_option(key, fname, what, v)
  raise(("bad option '%s' to '%s' (%s expected, got %s)"):format(key, fname, what, got(v)), 4)
end

local function opt_int(opts, key, fname)
  local v = opts[key]
  if v == nil then return nil end
  local i = math_type(v) and math_tointeger(v)
  if not i or i < 1 then bad_option(key, fname, "positive integer", v) end
  return i
end

local function opt_timeout(opts, key, fname)
  local v = opts[key]
  if v ~= nil and not (type(v) == "number" and v >= 0) then -- (nan fails v >= 0)
    bad_option(key, fname, "non-negative number", v)
  end
  return v
end

local function opt_positive(opts, key, fname)
  local v = opts[key]
  if v ~= nil and not (type(v) == "number" and v > 0) then
    bad_option(key, fname, "positive number of seconds", v)
  end
  return v
end

local function opt_boolean(opts, key, fname)
  local v = opts[key]
  if v ~= nil and type(v) ~= "boolean" then bad_option(key, fname, "boolean", v) end
  return v
end

-- The settings of progress = {...} are checked here, where the caller's
-- line is known: a bad one would otherwise fail inside the bar, later,
-- with a message about the bar's own code.
local function callable(v)
  if type(v) == "function" then return true end
  local mt = raw_getmetatable(v)
  return type(mt) == "table" and mt.__call ~= nil
end
-- In a fixed order, so that the first bad one is always the one named.
local PROGRESS_SETTINGS = {
  { "label", "string", function(v) return type(v) == "string" or type(v) == "number" end },
  { "output", "function", callable },
  { "tty", "boolean", function(v) return type(v) == "boolean" end },
  { "interval", "non-negative number", function(v) return type(v) == "number" and v >= 0 end },
  { "now", "function", callable },
}

local KNOWN_SETTING = {}
for _, rule in ipairs(PROGRESS_SETTINGS) do KNOWN_SETTING[rule[1]] = true end

local function opt_progress(opts, fname)
  local v = opts.progress
  if v ~= nil and type(v) ~= "boolean" and type(v) ~= "table" then
    bad_option("progress", fname, "boolean or table of settings", v)
  end
  if type(v) == "table" then
    for _, rule in ipairs(PROGRESS_SETTINGS) do
      local key, what, ok = rule[1], rule[2], rule[3]
      local x = v[key]
      if x ~= nil and not ok(x) then
        raise(("bad option 'progress' to '%s' (setting '%s': %s expected, got %s)")
          :format(fname, key, what, got(x)), 3)
      end
    end
    -- A misspelt setting (intervall, colour) was ignored in silence, as an
    -- unknown option of map is not (helper-52).
    for k in pairs(v) do
      if not KNOWN_SETTING[k] then
        raise(("bad option 'progress' to '%s' (unknown setting '%s')"):format(fname, tostring(k)), 3)
      end
    end
  end
  return v
end

-- A progress bar when opts.progress asks for one (true, or a table of
-- settings for progress.new), else a bar that does nothing.  Both are
-- to-be-closed values: closing ends the bar's line, so an error raised
-- while it is drawn (a task error, Ctrl-C) starts on a line of its own.
local function noop() end
local NO_BAR = setmetatable({ update = noop, finish = noop }, { __close = noop })
-- A clock setting is checked at each reading: what it returns is known
-- only then, and a non-number failed inside the bar's arithmetic
-- ("progress.lua:72: attempt to sub a 'string' with a 'string'": helper-52).
-- The error names the caller's line (raise passes over luapool's frames).
local function checked_clock(clock, fname)
  return function()
    local t = clock()
    if type(t) ~= "number" then
      raise(("bad option 'progress' to '%s' (setting 'now' must return a number, got %s)")
        :format(fname, typename(t)), 2)
    end
    return t
  end
end

local function bar_for(p, fname, total)
  if not p then return NO_BAR end
  local settings = type(p) == "table" and p or {}
  return progress.new {
    label = settings.label or fname, total = total, output = settings.output,
    tty = settings.tty, interval = settings.interval,
    now = settings.now and checked_clock(settings.now, fname),
  }
end

-- How long to wait at a time while a bar is drawn, so that it keeps
-- moving (elapsed, rate) while a long chunk runs: the bar's interval, but
-- not under a tenth of a second (an interval of 0 redraws at every update
-- and must not make a wait spin); nil when no bar is drawn.
local function slice_of(bar)
  local i = bar.interval
  return i and math_max(i, 0.1)
end

-- chunk_into, waiting in slices while a bar is drawn.
local function wait_chunk(f, out, offset, deadline, bar)
  local slice = slice_of(bar)
  while true do
    local left = deadline and math_max(0, deadline - now())
    if not slice then return chunk_into(f, out, offset, left) end
    local ok, err, k = chunk_into(f, out, offset, (left and left < slice) and left or slice)
    if ok ~= nil or (left and left <= slice) then return ok, err, k end
    bar:update(bar.done)
  end
end

-- Items per chunk when the caller gives none.  A process round trip costs
-- tens of microseconds, so process pools batch enough calls to amortize it
-- while keeping about four chunks per worker for balance; thread pools
-- hand out single calls, which spreads latency-bound work (fetches) evenly.
--
-- Whether a pool batches is a property of its engine, read from the pool:
-- pool.chunking is the engine's own property: true where a call costs a
-- round trip worth batching (a process boundary).
local function auto_chunksize(pool, n)
  if not pool.chunking then return 1 end
  local per = n // (pool.max_workers * 4)
  if per < 1 then return 1 end
  return per > 1024 and 1024 or per
end


-- map's guard, to be closed: left by an error of any kind, map cancels
-- every chunk it queued (the caller has no handle on them), as imap's
-- closing value does.  Before, an error of the items' own __index or
-- __len, or of the progress bar's output or now, left them all to run,
-- and shutdown() waited for them (helper-52).
local CANCEL_UNLESS_ENDED = { __close = function(g)
  if not g.ended then
    for _, f in ipairs(g.futures) do cancel(f) end
  end
end }

-- Names the item of an error from chunk future f, whose first item is
-- number lo: err.item = lo + k - 1 for its k-th call.  k is chunk_into's
-- third value: it gives one for a call's own failure (a task error, a
-- call's deadline, a result that could not travel) and none when the chunk
-- failed as a whole (a crash, a cancel...), which names one item only when
-- the chunk holds one (else its message names them: "items #a-#b").
local function name_item(err, f, lo, k)
  if type(err) ~= "table" then return err end
  if not k and chunk_size(f) == 1 then k = 1 end
  if k then err.item = lo + k - 1 end
  return err
end

-- The items lo..hi of a table with a metatable (its __index may supply
-- them) or, for starmap, of a chunk whose argument lists have one, copied
-- into a plain table, as Lua reads them: the C side reads raw.  Returns
-- the table and the range to send; a plain chunk is sent as it is.
local function plain_chunk(items, lo, hi, star, proxy)
  if star and not proxy then
    for i = lo, hi do
      local a = items[i]
      if type(a) == "table" and raw_getmetatable(a) then
        proxy = true
        break
      end
    end
  end
  if not proxy then return items, lo, hi end
  local t = {}
  for i = lo, hi do
    local v = items[i]
    if star and type(v) == "table" and raw_getmetatable(v) then
      v = { table_unpack(v, 1, #v) } -- table.unpack reads with __index and __len
    end
    t[i - lo + 1] = v
  end
  return t, 1, hi - lo + 1
end

-- How many of map's results were not ready when chunk c timed out: chunk
-- c's, and those of the later chunks not done (they may have run already).
local function not_ready(futures, c, chunk, n)
  local lo = (c - 1) * chunk + 1
  local missing = (lo + chunk - 1 > n and n or lo + chunk - 1) - lo + 1
  for d = c + 1, #futures do
    local f = futures[d]
    if not f:done() then missing = missing + chunk_size(f) end
  end
  return missing
end

-- {====== map and starmap

local MAP_OPTS = { chunksize = true, timeout = true, progress = true, task_timeout = true }

local function map_impl(pool, fn, items, opts, star, fname)
  check_pool(pool, fname)
  check_fn(fn, fname)
  if type(items) ~= "table" then
    argerror(2, fname, iterator_slip(items, fname, "table") or "table expected, got " .. typename(items))
  end
  local slip = callable_slip(items, fname, "table")
  if slip then argerror(2, fname, slip) end
  opts = options(opts, 3, fname, MAP_OPTS)
  local task_timeout = opt_positive(opts, "task_timeout", fname)
  local chunk = opt_int(opts, "chunksize", fname)
  local timeout = opt_timeout(opts, "timeout", fname)
  local show = opt_progress(opts, fname)
  -- Checked here, not only by submit_chunk: an empty input submits
  -- nothing, and returned {} after shutdown (helper-52).
  if is_closing(pool) then raise("cannot submit after shutdown", 2) end
  -- The sequence as Lua reads it: #items (its __len) and items[i].
  local len = #items
  local n = math_type(len) and math_tointeger(len)
  if not n then argerror(2, fname, "its length (__len) is not an integer: " .. got(len)) end
  if n < 0 then n = 0 end
  local proxy = raw_getmetatable(items) ~= nil
  -- A deadline is per task: with one, every item is its own task.
  chunk = chunk or (task_timeout or pool.task_timeout) and 1 or auto_chunksize(pool, n)
  local deadline = timeout and now() + timeout
  local futures = {}
  local guard <close> = setmetatable({ futures = futures }, CANCEL_UNLESS_ENDED)
  for lo = 1, n, chunk do
    local hi = lo + chunk - 1
    if hi > n then hi = n end
    local t, a, b = items, lo, hi
    if proxy or star then t, a, b = plain_chunk(items, lo, hi, star, proxy) end
    local f, err = submit_chunk(pool, fn, t, a, b, star, task_timeout, lo)
    if not f then
      raise((err:gsub("^bad item (#%d+) ", "bad item %1 to '" .. fname .. "' ")), 2)
    end
    futures[#futures + 1] = f
  end
  local bar <close> = bar_for(show, fname, n)
  bar:update(0) -- drawn as soon as the work is queued
  local results = {}
  for c = 1, #futures do
    local f = futures[c]
    local lo = (c - 1) * chunk + 1
    local ok, err, k = wait_chunk(f, results, lo, deadline, bar)
    if ok == nil then
      local missing = not_ready(futures, c, chunk, n)
      error(new_error("timeout", ("%s: %d of %d results not ready after %g seconds")
        :format(fname, missing, n, timeout)))
    elseif not ok then
      error(name_item(err, f, lo, k))
    end
    bar:update(lo + chunk_size(f) - 1)
  end
  guard.ended = true
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

-- The items of a table (its sequence as Lua reads it, #t and t[i], as long
-- as it is when imap starts) or of an iterator function (until it returns
-- nil; only its first value).  Returns the reader, the count (nil for an
-- iterator) and, for a table without a metatable, the table itself: its
-- chunks are sent straight from it (the C side reads raw, as Lua would).
local function item_source(iterable)
  if type(iterable) == "table" then
    local len = #iterable
    local n = math_type(len) and math_tointeger(len)
    if not n then argerror(2, "imap", "its length (__len) is not an integer: " .. got(len), 4) end
    if n < 0 then n = 0 end
    local i = 0
    return function()
      if i >= n then return false end
      i = i + 1
      return true, iterable[i]
    end, n, raw_getmetatable(iterable) == nil and iterable or nil
  end
  return function()
    local v = iterable()
    if v == nil then return false end
    return true, v
  end, nil, nil
end

-- imap's automatic chunking.  The first chunk is one item, so a slow task
-- yields its result as soon as it is done; then each chunk taken tells how
-- long a chunk of its size took from submission to its results (its run,
-- its wait in the queue and the caller's loop: an upper bound on the
-- tasks' time), and the next chunks are sized to take about CHUNK_TARGET:
-- at most doubled at a time, at once shrunk when they take longer, never
-- beyond CHUNK_MAX.  Tiny tasks thus reach CHUNK_MAX items a chunk within
-- a dozen chunks, which amortizes the round trip on any engine (a thread's
-- queue or a process's socket alike: it is measured, not assumed), while
-- tasks of a millisecond or more stay at one item a chunk.  The price: when
-- tiny tasks turn slow, the chunks already sent run to their end before
-- the size drops, so a result can wait up to CHUNK_MAX of the slow tasks;
-- CHUNK_MAX is kept small for that (256 items cost about 0.1 us an item
-- more than 1024 on threads, and bound the window to 512 items a worker).
local CHUNK_TARGET, CHUNK_MAX = 0.002, 256

local function next_chunksize(chunk, k, elapsed)
  local want = elapsed > 0 and k * CHUNK_TARGET / elapsed or CHUNK_MAX
  if want > 2 * chunk then want = 2 * chunk end
  if want > CHUNK_MAX then want = CHUNK_MAX end
  if want < 1 then return 1 end
  return math_floor(want) -- an integer: indexes stay integers
end

function methods.imap(pool, fn, iterable, opts)
  check_pool(pool, "imap")
  check_fn(fn, "imap")
  local kind = type(iterable)
  if kind ~= "table" and kind ~= "function" or iterable == IPAIRS_ITER or iterable == next then
    local expected = "table or iterator function"
    argerror(2, "imap", iterator_slip(iterable, "imap", expected) or
      expected .. " expected, got " .. typename(iterable))
  end
  local slip = callable_slip(iterable, "imap", "table or iterator function")
  if slip then argerror(2, "imap", slip) end
  opts = options(opts, 3, "imap", IMAP_OPTS)
  local chunk = opt_int(opts, "chunksize", "imap")
  local task_timeout = opt_positive(opts, "task_timeout", "imap")
  -- The window: an explicit buffersize bounds the items in flight (a chunk
  -- is sent while fewer are, cut to fit, an explicit chunksize too); by default
  -- it is twice the workers in chunks, at most CHUNK_MAX items each, or on a
  -- pool that runs many tasks at once per worker (an iopool's event loops:
  -- pool.concurrency) that many tasks of one item each.
  local buffersize = opt_int(opts, "buffersize", "imap")
  local concurrency = pool.concurrency
  local window = concurrency or 2 * pool.max_workers
  local ordered = opt_boolean(opts, "ordered", "imap") ~= false
  local show = opt_progress(opts, "imap")
  -- A deadline is per task: with one, every item is its own task.
  local auto = not chunk and not (task_timeout or pool.task_timeout) and not concurrency
  chunk = chunk or 1
  local next_item, total, plain = item_source(iterable)
  local bar = bar_for(show, "imap", total)

  -- In flight: chunks as {future, first index, count, submission time},
  -- oldest first for the ordered walk; a completion queue finds finished
  -- ones for the unordered.  A chunk leaves both when its results are
  -- taken, so only the chunks not yet handed out are held here.
  local inflight, head, tail, items_in_flight, chunks_in_flight = {}, 1, 0, 0, 0
  local by_future = {}
  local queue = (not ordered) and cq() or nil
  local exhausted, next_index, yielded = false, 1, 0
  local results, rpos, rlen, rfirst = {}, 1, 0, 0
  local started, closed = false, false

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
    while not exhausted do
      local want = chunk
      if buffersize then
        if items_in_flight >= buffersize then return end
        if want > buffersize - items_in_flight then want = buffersize - items_in_flight end
      elseif chunks_in_flight >= window then
        return
      end
      local f, err, k
      if plain then
        local hi = next_index + want - 1
        if hi >= total then
          hi = total
          exhausted = true
        end
        k = hi - next_index + 1
        if k <= 0 then return end
        f, err = submit_chunk(pool, fn, plain, next_index, hi, false, task_timeout, next_index)
      else
        local args = {}
        k = 0
        while k < want do
          local ok, v = next_item()
          if not ok then
            exhausted = true
            break
          end
          k = k + 1
          args[k] = v
        end
        if k == 0 then return end
        f, err = submit_chunk(pool, fn, args, 1, k, false, task_timeout, next_index)
      end
      if not f then
        close()
        raise(err, 3)
      end
      tail = tail + 1
      local c = { f, next_index, k, auto and now() }
      inflight[tail] = c
      next_index = next_index + k
      items_in_flight = items_in_flight + k
      chunks_in_flight = chunks_in_flight + 1
      if queue then
        by_future[f] = tail
        queue:add(f)
      end
    end
  end

  -- The next finished future of the unordered walk, waiting in slices of
  -- the bar's interval when a bar is drawn.
  local function pop()
    local slice = slice_of(bar)
    if not slice then return queue:pop() end
    while true do
      local f = queue:pop(slice)
      if f ~= nil then return f end
      bar:update(yielded)
    end
  end

  local function take(slot)
    local c = inflight[slot]
    inflight[slot] = nil
    if queue then by_future[c[1]] = nil end
    while head <= tail and inflight[head] == nil do head = head + 1 end
    local ok, err, k = wait_chunk(c[1], results, 1, nil, bar)
    if not ok then
      close()
      error(name_item(err, c[1], c[2], k), 0)
    end
    items_in_flight = items_in_flight - c[3]
    chunks_in_flight = chunks_in_flight - 1
    rpos, rlen, rfirst = 1, c[3], c[2]
    if auto then chunk = next_chunksize(chunk, c[3], now() - c[4]) end
  end

  local function iter()
    if closed then return nil end
    -- (an empty input submits nothing: the loop ended at once after
    -- shutdown, where a non-empty one raises from fill: helper-52)
    if not started and is_closing(pool) then
      close()
      raise("cannot submit after shutdown", 2)
    end
    if rpos > rlen then
      fill()
      if not started then
        started = true
        bar:update(0) -- drawn as soon as the first work is queued
      end
      if head > tail then
        close()
        return nil
      end
      if ordered then
        take(head)
      else
        take(by_future[pop()])
      end
      fill() -- keep the window full while the caller works on this chunk
    end
    local i, v = rfirst + rpos - 1, results[rpos]
    results[rpos] = nil
    rpos = rpos + 1
    yielded = yielded + 1
    if show then bar:update(yielded) end
    return i, v
  end

  -- The generic for's closing value: leaving the loop early (break, error,
  -- Ctrl-C, return) cancels what has not started and ends the bar's line.
  return iter, nil, nil, setmetatable({}, { __close = close })
end

-- }======

-- {====== as_completed and wait

-- Adds the futures of a list to a new completion queue.  Returns the
-- queue and the list of distinct futures when keep, else their count.
local function collect(futures, fname, keep)
  local q = cq()
  local list, count = keep and {} or nil, 0
  for i = 1, #futures do
    local f = futures[i]
    if not is_future(f) then
      q:close()
      argerror(1, fname, ("future expected at index %d, got %s"):format(i, typename(f)), 4)
    end
    if q:add(f) then
      count = count + 1
      if list then list[count] = f end
    end
  end
  return q, list or count
end

local function check_futures(futures, fname)
  if type(futures) ~= "table" then
    argerror(1, fname, "table of futures expected, got " .. typename(futures), 4)
  end
end

function luapool.as_completed(futures, timeout)
  check_futures(futures, "as_completed")
  if timeout ~= nil and not (type(timeout) == "number" and timeout >= 0) then
    argerror(2, "as_completed", "non-negative number expected, got " .. got(timeout))
  end
  -- Only the queue holds the futures: none is kept here once handed out.
  local q, total = collect(futures, "as_completed", false)
  local yielded = 0
  local deadline = timeout and now() + timeout
  local ended = false -- (then nil again, as an ended Lua iterator: its queue is closed)
  local function iter()
    if ended then return nil end
    local f = q:pop(deadline and math_max(0, deadline - now()))
    if f == false then
      ended = true
      q:close()
      return nil
    elseif f == nil then
      ended = true
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
  check_futures(futures, "wait")
  if type(opts) == "number" then -- wait(fs, 5), as Python's wait(fs, timeout)
    argerror(2, "wait", ("table expected, got number: write luapool.wait(futures, {timeout = %s})")
      :format(got(opts)))
  end
  opts = options(opts, 2, "wait", WAIT_OPTS)
  local timeout = opt_timeout(opts, "timeout", "wait")
  local when = opts.return_when or "ALL_COMPLETED"
  if not RETURN_WHEN[when] then
    raise(("bad option 'return_when' to 'wait' (ALL_COMPLETED, FIRST_COMPLETED or " ..
      "FIRST_EXCEPTION expected, got %s)"):format(type(when) == "string" and when or got(when)), 2)
  end
  local q <close>, list = collect(futures, "wait", true)
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
