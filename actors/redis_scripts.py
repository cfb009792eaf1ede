"""The Redis store's Lua scripts: each is one atomic step, so a task's row, its queue entry, its admission
counters and its event change together or not at all, whichever node runs them.

Keys (all under `forge:`):
- `task:<id>` hash: the task row (see `actors/redis_store.py` for its fields) plus its queue entry
  (`qstream`, `qid`), its claim (`worker`, `device`, `batch`) and a cancel request (`cancel`).
- `q:<prio>:<model>` streams with the consumer group `workers`: the queue. One stream per priority (00-20,
  higher first) and model, so a worker can prefer the models it holds; `queues` is the set of them. An entry
  is delivered to exactly one worker (its claim), stays pending while the worker heartbeats (XCLAIM JUSTID
  resets its idle time), and is acknowledged and deleted when the task leaves the queue for good. Streams
  are never trimmed: MAXLEN could drop entries still pending.
- `queued` sorted set: every queued task by (priority, arrival): the fleet-wide queue position is its rank.
- `ev:<id>` stream: the task's events, read by any node from the last id it saw; kept a day after the end.
- `tasks`, `owner:<owner>` sorted sets by seq (listing); `idem:<owner>:<key>`; `inflight:<owner>` set and
  `rate:<owner>` sorted set (plans); `counts` hash (tasks per state).
"""

from __future__ import annotations

PREFIX = "forge:"
GROUP = "workers"
EVENTS_TTL_S = 86400

_COMMON = """
local P = 'forge:'
local TERMINAL = {succeeded = true, failed = true, cancelled = true, filtered = true}
local function now_s()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1e6
end
local function fmt(x) return string.format('%.6f', x) end
local function event(id, json)
  if json and json ~= '' then
    redis.call('XADD', P .. 'ev:' .. id, 'MAXLEN', '~', '512', '*', 'e', json)
  end
end
local function ended(id)
  redis.call('EXPIRE', P .. 'ev:' .. id, 86400)
end
local function count(state, n) redis.call('HINCRBY', P .. 'counts', state, n) end
local function position(id) return redis.call('ZRANK', P .. 'queued', id) end
local function queued_event(id)
  return cjson.encode({type = 'queued', task_id = id, position = position(id)})
end
local function enqueue(id, attempt)
  local key = P .. 'task:' .. id
  local prio, model = unpack(redis.call('HMGET', key, 'priority', 'model'))
  local stream = P .. 'q:' .. prio .. ':' .. model
  if redis.call('SADD', P .. 'queues', stream) == 1 then
    redis.pcall('XGROUP', 'CREATE', stream, 'workers', '0', 'MKSTREAM')
  end
  local qid = redis.call('XADD', stream, '*', 'id', id, 'attempt', attempt)
  local qseq = redis.call('INCR', P .. 'qseq')
  redis.call('ZADD', P .. 'queued', string.format('%.0f', (99 - tonumber(prio)) * 1e12 + qseq), id)
  redis.call('HSET', key, 'qstream', stream, 'qid', qid)
  redis.call('PUBLISH', P .. 'wake', stream)
end
local function unqueue(key)
  local stream, qid = unpack(redis.call('HMGET', key, 'qstream', 'qid'))
  if stream and qid and stream ~= '' then
    redis.call('XACK', stream, 'workers', qid)
    redis.call('XDEL', stream, qid)
  end
  redis.call('HSET', key, 'qstream', '', 'qid', '')
end
local function finish(id, key, from)
  unqueue(key)
  if from == 'queued' then redis.call('ZREM', P .. 'queued', id) end
  redis.call('SREM', P .. 'inflight:' .. redis.call('HGET', key, 'owner'), id)
  ended(id)
end
"""

# ARGV: id, owner, idempotency key, request hash, spec JSON, priority (00-20), model, images, batch key,
# max queue, plan requests, plan window s, plan max queued, whether the plan applies ("1"/"0"), step-level
# batch key.
SUBMIT = (
    _COMMON
    + """
local id, owner, idem = ARGV[1], ARGV[2], ARGV[3]
if idem ~= '' then
  local earlier = redis.call('GET', P .. 'idem:' .. owner .. ':' .. idem)
  if earlier then return {'replay', earlier} end
end
if redis.call('ZCARD', P .. 'queued') >= tonumber(ARGV[10]) then return {'queue_full'} end
local now = now_s()
local rate, inflight = P .. 'rate:' .. owner, P .. 'inflight:' .. owner
if ARGV[14] == '1' then
  local requests, window, max_queued = tonumber(ARGV[11]), tonumber(ARGV[12]), tonumber(ARGV[13])
  if requests > 0 then
    redis.call('ZREMRANGEBYSCORE', rate, '-inf', fmt(now - window))
    if redis.call('ZCARD', rate) >= requests then
      local oldest = redis.call('ZRANGE', rate, 0, 0, 'WITHSCORES')
      return {'rate', fmt(tonumber(oldest[2]) + window - now)}
    end
  end
  if max_queued > 0 and redis.call('SCARD', inflight) >= max_queued then return {'busy'} end
  if requests > 0 then
    redis.call('ZADD', rate, fmt(now), id)
    redis.call('EXPIRE', rate, math.ceil(window) + 1)
  end
end
local seq = redis.call('INCR', P .. 'seq')
local key = P .. 'task:' .. id
redis.call('HSET', key, 'id', id, 'seq', seq, 'owner', owner, 'spec', ARGV[5], 'state', 'queued',
  'attempt', '1', 'created_at', fmt(now), 'updated_at', fmt(now), 'idempotency_key', idem,
  'request_hash', ARGV[4], 'priority', ARGV[6], 'model', ARGV[7], 'nimages', ARGV[8], 'bk', ARGV[9],
  'sbk', ARGV[15], 'images', '[]')
redis.call('ZADD', P .. 'tasks', seq, id)
redis.call('ZADD', P .. 'owner:' .. owner, seq, id)
if idem ~= '' then redis.call('SET', P .. 'idem:' .. owner .. ':' .. idem, id) end
redis.call('SADD', inflight, id)
count('queued', 1)
enqueue(id, '1')
event(id, queued_event(id))
return {'ok', seq, fmt(now)}
"""
)

# ARGV: id, attempt, to, event JSON ('' for none), number of from-states, the from-states, field/value pairs.
TRANSITION = (
    _COMMON
    + """
local id, attempt, to, ev = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local key = P .. 'task:' .. id
local state, current = unpack(redis.call('HMGET', key, 'state', 'attempt'))
if not state or current ~= attempt then return 0 end
local n = tonumber(ARGV[5])
local allowed = false
for i = 6, 5 + n do if ARGV[i] == state then allowed = true end end
if not allowed then return 0 end
local now = fmt(now_s())
local fields = {'state', to, 'updated_at', now}
for i = 6 + n, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', key, unpack(fields))
count(state, -1)
count(to, 1)
if to == 'queued' then
  unqueue(key)
  redis.call('HSET', key, 'worker', '', 'device', '', 'batch', '0', 'started_at', '', 'cancel', '')
  enqueue(id, attempt)
  event(id, queued_event(id))
  return 1
end
if TERMINAL[to] then finish(id, key, state) end
event(id, ev)
return 1
"""
)

# ARGV: consumer (worker name), device, most images to take, model affinity ms, the key field ('bk', or 'sbk'
# for step-level batching), the key of the device's running step-level batch ('' for none), the models the
# device holds. Takes the next task for this device, and the tasks right behind it in the same stream that
# can share its batch, marking them running: highest priority first; within a priority the oldest task of a
# model the device holds, unless another model's oldest has waited longer than the affinity allows. With a
# running batch, that next task joins it only if it has the batch's key; if not, nothing joins (the batch
# drains and the task runs next), as on one box.
CLAIM = (
    _COMMON
    + """
local consumer, device, max_images, affinity = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local key_field, joining = ARGV[5], ARGV[6]
local held = {}
for i = 7, #ARGV do held[ARGV[i]] = true end
local function parts(id)
  local ms, sq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(sq)
end
local function older(a, b)
  local am, as = parts(a)
  local bm, bs = parts(b)
  return am < bm or (am == bm and as < bs)
end
local function peek(stream)
  local last = '0-0'
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    if info['name'] == 'workers' then last = info['last-delivered-id'] end
  end
  return redis.call('XRANGE', stream, '(' .. last, '+', 'COUNT', 1)[1]
end
local function deliver(stream)
  redis.call('XREADGROUP', 'GROUP', 'workers', consumer, 'COUNT', 1, 'STREAMS', stream, '>')
end
local now = now_s()
local nowf = fmt(now)
local function take(stream)
  local taken, images, bk = {}, 0, nil
  if joining ~= '' then bk = joining end
  for _ = 1, 1000 do
    local head = peek(stream)
    if not head then break end
    local f = {}
    for k = 1, #head[2], 2 do f[head[2][k]] = head[2][k + 1] end
    local key = P .. 'task:' .. f['id']
    local state, attempt, n, tbk = unpack(redis.call('HMGET', key, 'state', 'attempt', 'nimages', key_field))
    tbk = tbk or ''
    if state ~= 'queued' or attempt ~= f['attempt'] then
      deliver(stream)
      redis.call('XACK', stream, 'workers', head[1])
      redis.call('XDEL', stream, head[1])
    else
      n = tonumber(n)
      if bk and (tbk == '' or tbk ~= bk or images + n > max_images) then
        if #taken == 0 then return taken, true end  -- a live head that may not join: it blocks the others
        break
      end
      deliver(stream)
      taken[#taken + 1] = f['id']
      images, bk = images + n, tbk
      redis.call('HSET', key, 'state', 'running', 'started_at', nowf, 'updated_at', nowf, 'worker', consumer,
        'device', device, 'cancel', '')
      redis.call('ZREM', P .. 'queued', f['id'])
      count('queued', -1)
      count('running', 1)
      if tbk == '' or images >= max_images then break end
    end
  end
  for _, id in ipairs(taken) do
    local key = P .. 'task:' .. id
    redis.call('HSET', key, 'batch', #taken)
    event(id, cjson.encode({type = 'started', task_id = id, attempt = tonumber(redis.call('HGET', key, 'attempt')),
      device = device, batch = #taken, worker = consumer}))
  end
  return taken, false
end
local streams = redis.call('SMEMBERS', P .. 'queues')
table.sort(streams, function(a, b) return a > b end)
local now_ms = now * 1000
local at = #P + 3
local i = 1
while i <= #streams do
  local prio = string.sub(streams[i], at, at + 1)
  local best_held, best_other = nil, nil
  local j = i
  while j <= #streams and string.sub(streams[j], at, at + 1) == prio do
    local head = peek(streams[j])
    if head then
      local candidate = {stream = streams[j], id = head[1]}
      if held[string.sub(streams[j], at + 3)] then
        if not best_held or older(candidate.id, best_held.id) then best_held = candidate end
      elseif not best_other or older(candidate.id, best_other.id) then
        best_other = candidate
      end
    end
    j = j + 1
  end
  local pick = best_held
  if best_other and (not best_held or
      (now_ms - parts(best_other.id) > affinity and older(best_other.id, best_held.id))) then
    pick = best_other
  end
  if pick then
    local taken, blocked = take(pick.stream)
    if #taken > 0 or blocked then return taken end
  else
    i = j
  end
end
return {}
"""
)

# ARGV: consumer, then id/attempt pairs. Per task: 1 still ours, 2 ours and cancel was asked for, 0 lost.
HEARTBEAT = (
    _COMMON
    + """
local consumer = ARGV[1]
local out = {}
for i = 2, #ARGV, 2 do
  local key = P .. 'task:' .. ARGV[i]
  local state, attempt, worker, stream, qid, cancel = unpack(redis.call('HMGET', key, 'state', 'attempt',
    'worker', 'qstream', 'qid', 'cancel'))
  if (state == 'running' or state == 'postprocessing') and attempt == ARGV[i + 1] and worker == consumer
      and stream and stream ~= '' then
    redis.call('XCLAIM', stream, 'workers', consumer, 0, qid, 'JUSTID')
    out[#out + 1] = (cancel == '1') and 2 or 1
  else
    out[#out + 1] = 0
  end
end
return out
"""
)

# ARGV: claim timeout ms, max attempts, failure message. Returns {requeued, failed}.
REAP = (
    _COMMON
    + """
local timeout, max_attempts, message = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local requeued, failed = 0, 0
local nowf = fmt(now_s())
for _, stream in ipairs(redis.call('SMEMBERS', P .. 'queues')) do
  for _, p in ipairs(redis.call('XPENDING', stream, 'workers', 'IDLE', timeout, '-', '+', 100)) do
    local qid = p[1]
    local entry = redis.call('XRANGE', stream, qid, qid)[1]
    local live = false
    if entry then
      local f = {}
      for k = 1, #entry[2], 2 do f[entry[2][k]] = entry[2][k + 1] end
      local id = f['id']
      local key = P .. 'task:' .. id
      local state, attempt, current = unpack(redis.call('HMGET', key, 'state', 'attempt', 'qid'))
      if (state == 'running' or state == 'postprocessing') and current == qid then
        live = true
        count(state, -1)
        if tonumber(attempt) >= max_attempts then
          redis.call('HSET', key, 'state', 'failed', 'error_code', 'worker_lost', 'error_message', message,
            'finished_at', nowf, 'updated_at', nowf, 'cancel', '')
          count('failed', 1)
          finish(id, key, state)
          event(id, cjson.encode({type = 'failed', task_id = id, code = 'worker_lost', message = message}))
          failed = failed + 1
        else
          local next_attempt = tostring(tonumber(attempt) + 1)
          unqueue(key)
          redis.call('HSET', key, 'state', 'queued', 'attempt', next_attempt, 'started_at', '', 'worker', '',
            'device', '', 'batch', '0', 'updated_at', nowf, 'cancel', '')
          count('queued', 1)
          enqueue(id, next_attempt)
          event(id, queued_event(id))
          requeued = requeued + 1
        end
      end
    end
    if not live then
      redis.call('XACK', stream, 'workers', qid)
      redis.call('XDEL', stream, qid)
    end
  end
end
return {requeued, failed}
"""
)

# ARGV: id, the `cancelled` event JSON. A queued task ends here; a running one is flagged (its worker reads
# the flag with its next heartbeat) and announced on `cancel` for the worker to stop it at once.
CANCEL = (
    _COMMON
    + """
local id = ARGV[1]
local key = P .. 'task:' .. id
local state = redis.call('HGET', key, 'state')
if state == 'queued' then
  local now = fmt(now_s())
  redis.call('HSET', key, 'state', 'cancelled', 'updated_at', now, 'finished_at', now)
  count('queued', -1)
  count('cancelled', 1)
  finish(id, key, 'queued')
  event(id, ARGV[2])
  return 'cancelled'
elseif state == 'running' or state == 'postprocessing' then
  redis.call('HSET', key, 'cancel', '1')
  redis.call('PUBLISH', P .. 'cancel', id)
  return 'signalled'
end
return state or 'missing'
"""
)

# ARGV: id, seq, owner, idempotency key, priority (00-20), model, images, batch key, then field/value pairs of
# the row as it was. A task that had not ended is queued again (one that was running: with attempt+1, as a
# restart would); `seq` keeps the order of the box it came from. Returns 0 if the id was there already.
IMPORT = (
    _COMMON
    + """
local id, seq, owner, idem = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local key = P .. 'task:' .. id
if redis.call('EXISTS', key) == 1 then return 0 end
local fields = {'priority', ARGV[5], 'model', ARGV[6], 'nimages', ARGV[7], 'bk', ARGV[8]}
for i = 9, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', key, unpack(fields))
local state, attempt = unpack(redis.call('HMGET', key, 'state', 'attempt'))
redis.call('ZADD', P .. 'tasks', seq, id)
redis.call('ZADD', P .. 'owner:' .. owner, seq, id)
if tonumber(redis.call('GET', P .. 'seq') or '0') < tonumber(seq) then redis.call('SET', P .. 'seq', seq) end
if idem ~= '' then redis.call('SET', P .. 'idem:' .. owner .. ':' .. idem, id) end
if TERMINAL[state] then
  count(state, 1)
  return 1
end
if state ~= 'queued' then
  attempt = tostring(tonumber(attempt) + 1)
  redis.call('HSET', key, 'state', 'queued', 'attempt', attempt, 'started_at', '')
end
redis.call('SADD', P .. 'inflight:' .. owner, id)
count('queued', 1)
enqueue(id, attempt)
return 1
"""
)
