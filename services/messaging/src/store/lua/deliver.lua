-- Delivers a message: a staged InMail once its debit is confirmed, or a new
-- free message.
--
-- KEYS[1]  the conversation hash   KEYS[2]  the message hash
-- KEYS[3]  the conversation's timeline (sorted set of delivered ids by seq)
-- ARGV[1]  mode: "staged" | "new"
-- ARGV[2]  message id   ARGV[3]  sender    ARGV[4]  recipient
-- ARGV[5]  kind         ARGV[6]  subject   ARGV[7]  body
-- ARGV[8]  credits      ARGV[9]  now ms    ARGV[10] a    ARGV[11] b
-- ARGV[12] refund window ms
-- ARGV[13] the sender's balance after ("" when unknown)
-- ARGV[14] the request's fingerprint (kept with a new message)
-- ARGV[15] "1": this message is the recipient's response to the sender's
--          InMail (RespondToInmail REPLY): one response per InMail
--
-- Checks before any write: a staged message is still staged / a new one does
-- not exist yet (else "exists" with its state); for a new one, no block
-- (BLOCKED) and the kind's condition still holds (AWAITING_RESPONSE, or
-- "retry": decide the kind again).
-- When the sender answers the recipient's InMail, the InMail is marked
-- replied (`im_reply` names the reply) and its refund "due" within the
-- window ("closed" after). In response mode (ARGV[15]) the InMail must await
-- this response: one already answered by a reply answers "responded" with
-- that reply, without storing anything (the caller refuses a body other
-- than that reply's); one accepted or declined is
-- NO_INMAIL_AWAITING_RESPONSE.
-- Reply (JSON): {"s":"ok","seq":n,"sent_at":ms,"refund":r?,"inmail_id":id?,
--   "inmail_sender":m?,"responded_at":ms?} | {"s":"exists","state":st,"fp":fp} |
--   {"s":"responded","reply_id":id,"refund":r,"inmail_id":id,"inmail_sender":m,
--   "responded_at":ms} | {"s":"refused","reason":r} | {"s":"retry"}
local C, M, T = KEYS[1], KEYS[2], KEYS[3]
local mode, id, sender, recipient, kind = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local now = tonumber(ARGV[9])
local st, fp = unpack(redis.call('HMGET', M, 'state', 'fp'))
local conv = {}
do
  local flat = redis.call('HGETALL', C)
  for i = 1, #flat, 2 do conv[flat[i]] = flat[i + 1] end
end
local function side(member) if member == ARGV[10] then return 'a' else return 'b' end end
local sent_at = now
if mode == 'staged' then
  if st ~= 'staged' then return cjson.encode({ s = 'exists', state = st or nil, fp = fp or '' }) end
  sent_at = tonumber(redis.call('HGET', M, 'at'))
else
  if st then return cjson.encode({ s = 'exists', state = st or nil, fp = fp or '' }) end
  if conv.blk_a or conv.blk_b then return cjson.encode({ s = 'refused', reason = 'BLOCKED' }) end
  local pending_own = (conv.im_state == 'staged' or conv.im_state == 'awaiting') and conv.im_from == sender
  if ARGV[15] == '1' then
    if conv.im_from ~= recipient or not conv.im_state then
      return cjson.encode({ s = 'refused', reason = 'NO_INMAIL_AWAITING_RESPONSE' })
    end
    if conv.im_state == 'replied' and conv.im_reply then
      return cjson.encode({ s = 'responded', reply_id = conv.im_reply, refund = conv.im_refund,
        inmail_id = conv.im_id, inmail_sender = conv.im_from, responded_at = tonumber(conv.im_resp_at) })
    end
    if conv.im_state ~= 'awaiting' then
      return cjson.encode({ s = 'refused', reason = 'NO_INMAIL_AWAITING_RESPONSE' })
    end
  end
  if kind == 'CONNECTION' then
    if conv.conn ~= '1' then return cjson.encode({ s = 'retry' }) end
  elseif kind == 'FOLLOW_UP' then
    if not pending_own then return cjson.encode({ s = 'retry' }) end
  else
    if pending_own then return cjson.encode({ s = 'refused', reason = 'AWAITING_RESPONSE' }) end
    if kind == 'REPLY' then
      local answering = conv.im_state == 'awaiting' and conv.im_from == recipient
      if not (answering or conv.open == '1' or tonumber(conv['w_' .. side(recipient)] or '0') > 0) then
        return cjson.encode({ s = 'retry' })
      end
    end
  end
  if not conv.a then redis.call('HSET', C, 'a', ARGV[10], 'b', ARGV[11], 'created', now) end
  redis.call('HSET', M, 'from', sender, 'to', recipient, 'kind', kind, 'subject', ARGV[6],
    'body', ARGV[7], 'credits', ARGV[8], 'at', now, 'fp', ARGV[14])
end
local seq = redis.call('HINCRBY', C, 'seq', 1)
redis.call('HSET', M, 'state', 'delivered', 'seq', seq, 'bal_after', ARGV[13])
redis.call('ZADD', T, seq, id)
redis.call('HINCRBY', C, 'count', 1)
redis.call('HINCRBY', C, 'w_' .. side(sender), 1)
redis.call('HSET', C, 'last', now, 'last_msg', id)
local reply = { s = 'ok', seq = seq, sent_at = sent_at }
if mode == 'staged' then
  redis.call('HSET', C, 'im_state', 'awaiting')
elseif conv.im_state == 'awaiting' and conv.im_from == recipient then
  local refund = (now <= tonumber(conv.im_at) + tonumber(ARGV[12])) and 'due' or 'closed'
  redis.call('HSET', C, 'im_state', 'replied', 'im_resp_at', now, 'open', 1, 'im_refund', refund,
    'im_reply', id)
  reply.refund, reply.inmail_id, reply.inmail_sender = refund, conv.im_id, conv.im_from
  reply.responded_at = now
end
return cjson.encode(reply)
