-- The REPL through a real terminal: the luapool binary runs in a tmux pane
-- (a pseudo-terminal), keys are typed with send-keys and the screen is read
-- back with capture-pane.  Every test has a tmux server of its own (a unique
-- -L socket, so parallel runs do not collide), killed whatever happens.
local h = require "helper"
local luapool = require "luapool"

local has_tmux = os.execute("command -v tmux >/dev/null 2>&1")
local help = h.run({ "--help" })
local has_readline = help:find("(with readline)", 1, true) ~= nil
local BANNER = "^luapool 0%.1%.0 %(Lua 5%.4%.%d+%)$"

local function sh(cmd)
  local p = assert(io.popen(cmd .. " 2>&1"))
  local out = p:read("a")
  local ok, _, code = p:close()
  return out, ok and 0 or code
end

local Term = {}
Term.__index = Term

-- Starts `luapool ARGS` in a 120x40 pane, through a shell that prints its
-- exit status afterwards and then keeps the pane open.
local function term(args)
  local t = setmetatable({}, Term)
  t.socket = ("luapool-repl-%d-%d"):format(os.time(), math.random(1, 1 << 30))
  t.tmux = "tmux -f /dev/null -L " .. t.socket
  local cmd = { h.shell_quote(h.bin) }
  for _, a in ipairs(args or {}) do cmd[#cmd + 1] = h.shell_quote(a) end
  -- INPUTRC=/dev/null: the user's readline bindings play no part
  local line = "cd " .. h.shell_quote(h.source_dir) .. " && INPUTRC=/dev/null " .. table.concat(cmd, " ")
    .. '; echo "status=$?"; exec sleep 3600'
  local out, code = sh(t.tmux .. " new-session -d -x 120 -y 40 -s repl " .. h.shell_quote(line))
  assert(code == 0, "tmux new-session failed: " .. out)
  t.socket_path = sh(t.tmux .. " display-message -p '#{socket_path}'"):match("^[^\n]+")
  return t
end

-- The server goes, and its socket file (kill-server leaves it behind).
function Term:kill()
  sh(self.tmux .. " kill-server")
  if self.socket_path then os.remove(self.socket_path) end
end

-- The pane's text, scrollback included, without trailing blanks (the
-- prompt "> " reads ">") and trailing empty lines.
function Term:screen()
  local out = sh(self.tmux .. " capture-pane -p -J -S - -t repl")
  return (out:gsub("[ \t]+\n", "\n"):gsub("[ \t]+$", ""):gsub("\n+$", ""))
end

function Term:lines()
  local lines = {}
  for l in (self:screen() .. "\n"):gmatch("(.-)\n") do lines[#lines + 1] = l end
  return lines
end

-- Waits (polling, generous limit) until pred(screen) holds.
function Term:wait(pred, what, limit)
  local deadline = luapool.now() + (limit or 30)
  while true do
    local s = self:screen()
    if pred(s) then return s end
    if luapool.now() >= deadline then
      error("gave up waiting for " .. what .. "; the screen:\n" .. s, 2)
    end
    luapool.sleep(0.05)
  end
end

-- Waits until the last line of the screen is `last` exactly.
function Term:wait_last(last, limit)
  return self:wait(function(s) return (s:match("[^\n]*$")) == last end, ("a last line %q"):format(last), limit)
end

-- Waits until the screen ends with these lines (output, then the prompt).
function Term:wait_tail(tail, limit)
  local want = "\n" .. table.concat(tail, "\n")
  return self:wait(function(s) return ("\n" .. s):sub(-#want) == want end,
    "the last lines " .. table.concat(tail, " | "), limit)
end

function Term:wait_text(text, limit)
  return self:wait(function(s) return s:find(text, 1, true) ~= nil end, ("%q"):format(text), limit)
end

function Term:type(text)
  sh(self.tmux .. " send-keys -t repl -l " .. h.shell_quote(text))
end

function Term:key(name)
  sh(self.tmux .. " send-keys -t repl " .. name)
end

-- Types a line at the prompt (once the prompt is there) and presses Enter.
function Term:enter(text, prompt)
  self:wait_last(prompt or ">")
  self:type(text)
  self:wait_last((prompt or ">") .. " " .. text)
  self:key("Enter")
end

-- The lines after the banner line.
function Term:transcript()
  local lines = self:lines()
  for i, l in ipairs(lines) do
    if l:match(BANNER) then return { table.unpack(lines, i + 1) } end
  end
  error("no banner on the screen:\n" .. table.concat(lines, "\n"))
end

-- Runs fn(t) with a fresh terminal running `luapool ARGS`; the tmux server
-- is killed whatever happens.
local function with_repl(args, fn)
  local t = term(args)
  local ok, err = pcall(fn, t)
  t:kill()
  if not ok then error(err, 0) end
end

-- The frames of a REPL error's traceback, as lua 5.4 prints them.
local function traceback(...)
  return { "stack traceback:", ... }
end

local function concat(...)
  local r = {}
  for _, l in ipairs { ... } do
    for _, x in ipairs(l) do r[#r + 1] = x end
  end
  return r
end

local describe_tty = has_tmux and describe or function(name)
  describe(name, function() pending("tmux is not installed: the REPL's terminal tests are skipped") end)
end

describe_tty("the REPL on a terminal", function()
  it("shows the banner and prints expressions, =expr and several values (print's tostring, tabs)", function()
    with_repl({}, function(t)
      t:wait(function(s) return s:match("luapool 0%.1%.0 %(Lua 5%.4%.%d+%)\n>$") end, "banner and prompt")
      t:enter("1+1")
      t:enter("=2, 'a', nil, true")
      t:enter("x = 40")
      t:enter("x + 2")
      t:enter("return 'r', x")
      t:enter("setmetatable({}, {__tostring = function() return 'T!' end})")
      t:enter("=")  -- "return": nothing to print
      t:enter("_PROMPT = 'lp> '")
      t:enter("=_PROMPT", "lp>")
      t:wait_last("lp>")
      assert.are.same({
        "> 1+1", "2",
        "> =2, 'a', nil, true", "2       a       nil     true", -- tab stops every 8 columns
        "> x = 40",
        "> x + 2", "42",
        "> return 'r', x", "r       40",
        "> setmetatable({}, {__tostring = function() return 'T!' end})", "T!",
        "> =",
        "> _PROMPT = 'lp> '",
        "lp> =_PROMPT", "lp>", -- (screen() drops trailing blanks)
        "lp>",
      }, t:transcript())
    end)
  end)

  it("waits for the rest of an incomplete statement with the >> prompt, and _PROMPT2", function()
    with_repl({}, function(t)
      t:enter("for i = 1,")
      t:enter("3 do", ">>")
      t:enter("print(i * 10)", ">>")
      t:enter("end", ">>")
      t:enter("_PROMPT2 = '... '")
      t:enter("x = 'a")  -- a string open at the end of the line waits too, as in lua
      t:enter("b'", "...")
      t:enter("=x")
      t:enter("function f()")
      t:enter("return 7 end", "...")
      t:enter("=f()")
      t:wait_last(">")
      assert.are.same({
        "> for i = 1,", ">> 3 do", ">> print(i * 10)", ">> end", "10", "20", "30",
        "> _PROMPT2 = '... '",
        "> x = 'a", "... b'", "stdin:1: unfinished string near ''a'",
        "> =x", "nil",
        "> function f()", "... return 7 end",
        "> =f()", "7",
        ">",
      }, t:transcript())
    end)
  end)

  it("reports an error line (message and traceback, no program name) and runs the next line", function()
    with_repl({}, function(t)
      t:enter("error('boom')")
      t:enter("x = = 1")
      t:enter("nil + 1")
      t:enter("=40 + 2")
      t:wait_last(">")
      assert.are.same(concat(
        { "> error('boom')", "stdin:1: boom" },
        traceback("        [C]: in function 'error'", "        stdin:1: in main chunk", "        [C]: in ?"),
        { "> x = = 1", "stdin:1: unexpected symbol near '='" },
        { "> nil + 1", "stdin:1: attempt to perform arithmetic on a nil value" },
        traceback("        stdin:1: in main chunk", "        [C]: in ?"),
        { "> =40 + 2", "42", ">" }), t:transcript())
    end)
  end)

  it("Ctrl-C cancels the line being typed, or the whole incomplete statement", function()
    with_repl({}, function(t)
      t:wait_last(">")
      t:type("x = 1 +")
      t:wait_last("> x = 1 +")
      t:key("C-c")
      t:wait_last(">")
      t:enter("=x")  -- the cancelled line did not run
      t:enter("for i = 1, 2 do")
      t:enter("print('never')", ">>")
      t:wait_last(">>")
      t:type("y = 1")
      t:wait_last(">> y = 1")
      t:key("C-c")
      t:enter("=y") -- back at the first prompt: nothing of the statement ran
      t:wait_last(">")
      assert.are.same({
        "> x = 1 +^C",
        "> =x", "nil",
        "> for i = 1, 2 do", ">> print('never')", ">> y = 1^C",
        "> =y", "nil",
        ">",
      }, t:transcript())
    end)
  end)

  it("Ctrl-C interrupts a running statement with an interrupted error, and the REPL answers after it", function()
    with_repl({}, function(t)
      t:enter("print('spinning') while true do end")
      t:wait_last("spinning")
      t:key("C-c")
      t:wait_text("stack traceback:")
      t:enter("=1 + 1")
      t:wait_tail({ "2", ">" })
      -- and again (a delivered interruption re-arms)
      t:enter("n = 0 print('again') while true do n = n + 1 end")
      t:wait_last("again")
      t:key("C-c")
      t:enter("=n > 0")
      t:wait_last(">")
      local lines = t:transcript()
      assert.are.equal("> print('spinning') while true do end", lines[1])
      assert.are.equal("spinning", lines[2])
      -- (the terminal echoes the ^C)
      assert.matches("^%^?C?interrupted: the script received SIGINT$", lines[3])
      assert.are.same(traceback("        stdin:1: in main chunk", "        [C]: in ?"), { table.unpack(lines, 4, 6) })
      assert.are.same({ "> =1 + 1", "2", "> n = 0 print('again') while true do n = n + 1 end", "again" },
        { table.unpack(lines, 7, 10) })
      assert.matches("^%^?C?interrupted: the script received SIGINT$", lines[11])
      assert.are.same({ "> =n > 0", "true", ">" }, { table.unpack(lines, #lines - 2) })
    end)
  end)

  it("uses a threadpool, and Ctrl-C in a wait stops its task and leaves the pool usable", function()
    with_repl({}, function(t)
      t:enter("p = threadpool.new{max_workers = 2}")
      t:enter("=table.concat(p:map(function(x) return x * x end, {1, 2, 3}), ' ')")
      t:wait_tail({ "1 4 9", ">" })
      t:enter("f = p:submit(function() while true do end end)")
      t:enter("print('waiting') f:result()")
      t:wait_last("waiting")
      t:key("C-c")
      t:wait_text("stack traceback:")
      t:enter("=f:exception().kind")
      t:wait_tail({ "interrupted", ">" })
      t:enter("=p:submit(function(a, b) return a + b end, 40, 2):result()")
      t:wait_tail({ "42", ">" })
      t:enter("p:shutdown()")
      t:wait_last(">")
      local lines = t:transcript()
      assert.are.same({ "> p = threadpool.new{max_workers = 2}",
        "> =table.concat(p:map(function(x) return x * x end, {1, 2, 3}), ' ')", "1 4 9",
        "> f = p:submit(function() while true do end end)",
        "> print('waiting') f:result()", "waiting" }, { table.unpack(lines, 1, 6) })
      assert.matches("interrupted: the script received SIGINT$", lines[7])
      assert.are.same({ "> =f:exception().kind", "interrupted",
        "> =p:submit(function(a, b) return a + b end, 40, 2):result()", "42",
        "> p:shutdown()", ">" }, { table.unpack(lines, #lines - 5) })
    end)
  end)

  local it_rl = has_readline and it or function(name)
    it(name, function() pending("this luapool is built without readline (no libreadline-dev at build time)") end)
  end
  it_rl("recalls the previous lines with the up arrow (readline history)", function()
    with_repl({}, function(t)
      t:enter("=6 * 7")
      t:enter("x = 1")
      t:wait_last(">")
      t:key("Up")
      t:wait_last("> x = 1")
      t:key("Up")
      t:wait_last("> =6 * 7")
      t:key("Enter")
      t:wait_last(">")
      assert.are.same({ "> =6 * 7", "42", "> x = 1", "> =6 * 7", "42", ">" }, t:transcript())
    end)
  end)

  it("exits with status 0 on Ctrl-D, after printing a newline", function()
    with_repl({}, function(t)
      t:enter("x = 1")
      t:wait_last(">")
      t:key("C-d")
      t:wait_last("status=0")
      assert.are.same({ "> x = 1", ">", "status=0" }, t:transcript()) -- (the newline after ">")
    end)
  end)

  it_rl("Ctrl-D on a half-typed line deletes a character, it does not exit", function()
    with_repl({}, function(t)
      t:wait_last(">")
      t:type("=5")
      t:wait_last("> =5")
      t:key("Left")
      t:key("C-d")
      t:wait_last("> =")
      t:key("C-e")
      t:type("9")
      t:key("Enter")
      t:wait_last(">")
      t:key("C-d")
      t:wait_last("status=0")
      assert.are.same({ "> =9", "9", ">", "status=0" }, t:transcript())
    end)
  end)

  it("-i enters the REPL after -e and the script, with the script's globals", function()
    local script = h.tempfile("answer = 42\nprint('from script', ...)\n")
    local ok, err = pcall(with_repl, { "-e", "pre = 'e'", "-i", script, "a1" }, function(t)
      t:enter("=answer, pre, arg[1]")
      t:wait_last(">")
      t:key("C-d")
      t:wait_last("status=0")
      assert.are.same({ "from script     a1", "> =answer, pre, arg[1]", "42      e       a1", ">", "status=0" },
        t:transcript())
    end)
    os.remove(script)
    assert(ok, err)
  end)

  it("SIGTERM at the prompt ends the host with status 143", function()
    local pidfile = os.tmpname()
    local code = ("local f = io.open(%q, 'w') f:write(io.open('/proc/self/stat'):read('a'):match('^%%d+')) f:close()")
      :format(pidfile)
    local ok, err = pcall(with_repl, { "-e", code, "-i" }, function(t)
      t:wait_last(">")
      local pid = h.slurp(pidfile)
      assert.truthy(pid and pid:match("^%d+$"), pid)
      sh("kill -TERM " .. pid)
      t:wait_last("status=143")
      assert.are.same({ ">", "luapool: interrupted: the script received SIGTERM", "status=143" }, t:transcript())
    end)
    os.remove(pidfile)
    assert(ok, err)
  end)
end)

describe("the REPL and stdin without a terminal", function()
  it("runs stdin as a script when it is not a terminal and no -i is given", function()
    local out, err, code = h.run({}, "x = 6 * 7\nprint(x)\n")
    assert.are.same({ "42\n", "", 0 }, { out, err, code })
  end)

  it("-i reads statements from a pipe with prompts, prints values with tabs, exits 0 at the end", function()
    local out, err, code = h.run({ "-i" }, "=2, 'a', nil\nfor i = 1, 2 do\nprint(i)\nend\nerror('e', 0)\nx = 1 +\n")
    assert.are.equal(0, code)
    assert.matches(BANNER:sub(1, -2) .. "\n", out)
    assert.are.equal("> 2\ta\tnil\n> >> >> 1\n2\n> > >> \n", out:gsub("^[^\n]*\n", "", 1))
    assert.matches("^e\nstack traceback:\n\t%[C%]: in function 'error'\n", err)
  end)

  it("-i after a script that fails does not enter the REPL (as lua), exit 1", function()
    local script = h.tempfile("error('bad', 0)\n")
    local out, err, code = h.run({ "-i", script }, "print('never')\n")
    os.remove(script)
    assert.are.equal(1, code)
    assert.matches(BANNER:sub(1, -2) .. "\n$", out)
    assert.matches("^luapool: bad\nstack traceback:\n", err)
  end)

  it("--help lists every option and environment variable, one line each", function()
    local out, _, code = h.run({ "--help" })
    assert.are.equal(0, code)
    for _, opt in ipairs { "-e stat", "-i", "-l mod", "-l g=mod", "-v", "-E", "-W", "-h", "--", "-" } do
      assert.truthy(out:find("\n  " .. opt:gsub("%p", "%%%0") .. " +%S"), "no line for " .. opt)
    end
    for _, var in ipairs { "LUAPOOL_WORKER_EXE", "LUA_PATH_5_4", "LUA_PATH", "LUA_CPATH_5_4", "LUA_CPATH" } do
      assert.truthy(out:find("\n  " .. var .. " +%S"), "no line for " .. var)
    end
    assert.are.equal(has_readline, out:find("\n  INPUTRC +%S") ~= nil)
  end)
end)
