-- The append load under wrk (tools/bench/wrk.py writes the parameters above this text:
-- HEAD_LINES, PREFIX, STREAMS, THREADS, MODE, CONTENT_TYPE).
--
-- Thread t of THREADS numbers its requests 0, 1, 2, ... (one counter for all its
-- connections) and sends request q to its stream number q mod n of the n streams it owns
-- (s with s mod THREADS == t; stream t mod STREAMS when it owns none). The body is derived
-- from (stream, t, q) exactly as append.py's body_bytes / message / json_body derive it, so
-- the read-back can name every record. Each thread counts what it sent and how it was
-- answered; done() prints the counts for the verifier (verify_seq.py).

local FILLER = string.rep("abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", 4)
local PAYLOAD = FILLER:sub(1, 60)
local threads = {}

function setup(thread)
   thread:set("tid", #threads)
   table.insert(threads, thread)
end

function init(args)
   owned, heads = {}, {}
   for s = tid, STREAMS - 1, THREADS do
      table.insert(owned, s)
   end
   if #owned == 0 then
      owned = {tid % STREAMS}
   end
   for i, s in ipairs(owned) do
      heads[i] = "POST " .. PREFIX .. s .. " HTTP/1.1\r\n" .. HEAD_LINES
         .. "content-type: " .. CONTENT_TYPE .. "\r\ncontent-length: "
   end
   sent, ok, refused, doubt = 0, 0, 0, 0
   -- wrk calls request() once in thread 0 before the run, only to check that it parses
   -- (script_verify_request): that call is not sent and must not take a number.
   checking = tid == 0
end

local function message(s, q)
   return string.format('{"s":%d,"c":%d,"q":%d,"p":"%s"}', s, tid, q, PAYLOAD)
end

local function body(s, q)
   if MODE == "json" then
      return message(s, q)
   elseif MODE == "json10" then
      local parts = {}
      for j = 0, 9 do
         parts[j + 1] = message(s, q * 10 + j)
      end
      return "[" .. table.concat(parts, ",") .. "]"
   end
   local head = string.format("s%05dc%04dq%09d|", s, tid, q)
   return head .. FILLER:sub(1, 99 - #head) .. "\n"
end

function request()
   local q = sent
   if checking then
      checking = false
   else
      sent = q + 1
   end
   local slot = q % #owned + 1
   local b = body(owned[slot], q)
   return heads[slot] .. #b .. "\r\n\r\n" .. b
end

function response(status, headers, b)
   if status >= 200 and status < 300 then
      ok = ok + 1
   elseif status >= 400 and status < 500 then
      refused = refused + 1
   else
      doubt = doubt + 1
   end
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format("wrk-summary %d %d %d %d %d %d\n", summary.duration,
      e.connect, e.read, e.write, e.timeout, e.status))
   io.write(string.format("wrk-latency-us %d %d %d\n", latency:percentile(50),
      latency:percentile(99), latency.max))
   for _, t in ipairs(threads) do
      io.write(string.format("wrk-thread %d %d %d %d %d\n", t:get("tid"), t:get("sent"),
         t:get("ok"), t:get("refused"), t:get("doubt")))
   end
end
