-- The I/O-bound reference job: fetch pages on a threadpool (or an iopool)
-- and print each body's length, in input order.
--
-- usage: luapool scripts/io.lua [--workers N] [--pool KIND] [--concurrency N]
--                                [--urls FILE] [--sequential] [--progress] [URL...]
--   --workers N    threadpool size (default 5); an iopool's loop threads (default 1)
--   --pool KIND    threadpool (default) or iopool: one event loop thread runs
--                  every fetch at once, each task a coroutine
--   --concurrency N  iopool: fetches in flight at once (default 1000)
--   --urls FILE    read URLs from FILE, one per line (blank lines and #
--                  comments skipped), before any given on the command line
--   --sequential   fetch one after the other in the main thread instead
--   --progress     a progress bar on stderr as fetches complete
-- Exit status: 0 when every URL was fetched, 1 when any failed.

local DEFAULT_URLS = {
  "https://www.google.com",
  "https://www.yahoo.com",
  "https://www.bing.com",
  "https://www.duckduckgo.com",
  "https://www.wikipedia.org",
}

local function usage(msg)
  io.stderr:write("io.lua: ", msg, "\n",
    "usage: luapool scripts/io.lua [--workers N] [--pool KIND] [--concurrency N] [--urls FILE] "
      .. "[--sequential] [--progress] [URL...]\n")
  os.exit(2)
end

local workers, sequential, show_progress, urls = nil, false, false, {}
local pool_kind, concurrency = "threadpool", nil
local args = { ... }
local i = 1
while i <= #args do
  local a = args[i]
  if a == "--workers" then
    workers = math.tointeger(tonumber(args[i + 1]))
    if not workers or workers < 1 then usage("--workers needs a positive integer") end
    i = i + 1
  elseif a == "--pool" then
    pool_kind = args[i + 1]
    if pool_kind ~= "threadpool" and pool_kind ~= "iopool" then
      usage("--pool needs threadpool or iopool")
    end
    i = i + 1
  elseif a == "--concurrency" then
    concurrency = math.tointeger(tonumber(args[i + 1]))
    if not concurrency or concurrency < 1 then usage("--concurrency needs a positive integer") end
    i = i + 1
  elseif a == "--urls" then
    local path = args[i + 1] or usage("--urls needs a file")
    local f, err = io.open(path)
    if not f then usage(err) end
    local before = #urls
    local ok, rerr = pcall(function()
      for line in f:lines() do
        line = line:match("^%s*(.-)%s*$")
        if line ~= "" and line:sub(1, 1) ~= "#" then urls[#urls + 1] = line end
      end
    end)
    f:close()
    if not ok then usage(path .. ": " .. tostring(rerr):gsub("^.*:%d+: ", "")) end
    -- an empty list is a mistake, never a reason to fetch the public sites
    if #urls == before then usage(path .. ": no URLs in it") end
    i = i + 1
  elseif a == "--sequential" then
    sequential = true
  elseif a == "--progress" then
    show_progress = true
  elseif a:sub(1, 2) == "--" then
    usage("unknown option " .. a)
  else
    urls[#urls + 1] = a
  end
  i = i + 1
end
if #urls == 0 then urls = DEFAULT_URLS end
if concurrency and pool_kind ~= "iopool" then usage("--concurrency is for --pool iopool") end

-- The task: runs in a worker thread (or in main when sequential).  The
-- body length comes from the native libcurl kernel.
local function fetch_url(url)
  print(("Fetching %s in thread %s"):format(url, luapool.current_worker().name))
  return luapool.kernels.fetch_length(url)
end

-- The iopool task: a coroutine of the loop; http.get yields to the loop
-- while the page comes (fetch_length called from Lua would block it).
local function fetch_url_io(url)
  print(("Fetching %s in loop %s"):format(url, luapool.current_worker().name))
  local r, err = luapool.http.get(url)
  if not r then error(err, 0) end
  return #r.body
end

-- The reason of a failed fetch without "fetch_length: URL: " (or "GET URL: ").
local function reason(err, url)
  local msg = type(err) == "table" and err.message or tostring(err)
  for _, prefix in ipairs { "fetch_length: " .. url .. ": ", "GET " .. url .. ": " } do
    if msg:sub(1, #prefix) == prefix then msg = msg:sub(#prefix + 1) end
  end
  return msg
end

local results = {} -- [i] = {ok, length or reason}
local bar = show_progress and require("luapool.progress").new { label = "fetch", total = #urls }
local start = luapool.now()
local label
if sequential then
  label = "sequential"
  for k, url in ipairs(urls) do
    local ok, len = pcall(fetch_url, url)
    results[k] = { ok, ok and len or reason(len, url) }
    if bar then bar:update(k) end
  end
else
  label = pool_kind
  -- (a --workers or --concurrency past the pool's range is a usage error,
  -- said by the pool itself: its message names the range)
  local made, pool = pcall(function()
    if pool_kind == "iopool" then
      return luapool.iopool.new { max_workers = workers or 1, concurrency = concurrency, name = "io" }
    end
    return threadpool.new { max_workers = workers or 5, name = "io" }
  end)
  if not made then usage(tostring(pool):gsub("^.-:%d+: ", "")) end
  local _ <close> = pool
  local task = pool_kind == "iopool" and fetch_url_io or fetch_url
  local futures, index = {}, {}
  for k, url in ipairs(urls) do
    futures[k] = pool:submit(task, url)
    index[futures[k]] = k
  end
  local finished = 0
  for f in luapool.as_completed(futures) do
    local k = index[f]
    local ok, len = pcall(f.result, f)
    results[k] = { ok, ok and len or reason(len, urls[k]) }
    finished = finished + 1
    if bar then bar:update(finished) end
  end
end
if bar then bar:finish() end
print(("%s execution time: %.4f seconds"):format(label, luapool.now() - start))

local failed = 0
for k, url in ipairs(urls) do
  local r = results[k]
  if r[1] then
    print(("%s: %d"):format(url, r[2]))
  else
    failed = failed + 1
    print(("%s: error: %s"):format(url, r[2]))
  end
end
if failed > 0 then os.exit(1) end
