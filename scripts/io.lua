-- The I/O-bound reference job: fetch pages on a threadpool and print each
-- body's length, in input order.
--
-- usage: luapool scripts/io.lua [--workers N] [--urls FILE] [--sequential]
--                                [--progress] [URL...]
--   --workers N    threadpool size (default 5)
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
    "usage: luapool scripts/io.lua [--workers N] [--urls FILE] [--sequential] [--progress] [URL...]\n")
  os.exit(2)
end

local workers, sequential, show_progress, urls = 5, false, false, {}
local args = { ... }
local i = 1
while i <= #args do
  local a = args[i]
  if a == "--workers" then
    workers = math.tointeger(tonumber(args[i + 1]))
    if not workers or workers < 1 then usage("--workers needs a positive integer") end
    i = i + 1
  elseif a == "--urls" then
    local path = args[i + 1] or usage("--urls needs a file")
    local f, err = io.open(path)
    if not f then usage(err) end
    for line in f:lines() do
      line = line:match("^%s*(.-)%s*$")
      if line ~= "" and line:sub(1, 1) ~= "#" then urls[#urls + 1] = line end
    end
    f:close()
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

-- The task: runs in a worker thread (or in main when sequential).  The
-- body length comes from the native libcurl kernel.
local function fetch_url(url)
  print(("Fetching %s in thread %s"):format(url, luapool.current_worker().name))
  return luapool.kernels.fetch_length(url)
end

-- The reason of a failed fetch without the kernel's "fetch_length: URL: ".
local function reason(err, url)
  local msg = type(err) == "table" and err.message or tostring(err)
  local prefix = "fetch_length: " .. url .. ": "
  if msg:sub(1, #prefix) == prefix then msg = msg:sub(#prefix + 1) end
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
  label = "threadpool"
  local pool <close> = threadpool.new { max_workers = workers, name = "io" }
  local futures, index = {}, {}
  for k, url in ipairs(urls) do
    futures[k] = pool:submit(fetch_url, url)
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
