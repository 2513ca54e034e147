#!/usr/bin/env python3
"""What each part of billing's debit script costs Redis (issue 12's profile).

Runs billing's debit script exactly as the service assembles it
(services/billing-credits/src/store/lua/: account_args + request + account +
debit) on a private redis-server, then variants with one guarantee's work
taken out of the text, and the thin ideal's script; prints, per call, the
instructions Redis executed (valgrind callgrind: the same on a busy machine
as on an idle one) or, with --time, Redis µs from INFO commandstats (noisy
here). Each variant runs on a fresh keyspace with a funded account, 50 calls
per pipeline, the way billing runs them (no AOF: fsync is not in either
figure).

    pip install redis     # the client; valgrind and redis-server from Debian
    python3 scripts/debit-ablation.py [--time] [--calls N] [VARIANT ...]

A variant is a name or names joined by '+': see VARIANTS. The variants are
measurements, never shipped: they drop guarantees on purpose.
"""
import argparse
import glob
import json
import os
import re
import socket
import subprocess
import tempfile
import time

import redis

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
LUA = os.path.join(ROOT, 'services/billing-credits/src/store/lua')
THIN = os.path.join(ROOT, '..', 'shared', 'bench', 'thin-ideal', 'debit.lua')


def read(name):
    with open(os.path.join(LUA, name)) as f:
        return f.read()


PRELUDE = read('account_args.lua') + read('request.lua') + read('account.lua')
DEBIT = read('debit.lua')

VARIANTS = {
    'full': 'the shipped script',
    'no-ledger': 'without the DEBIT ledger entry (XADD)',
    'no-debit-record': 'without the held debit record (HGETALL check, HSET)',
    'no-request-record': 'without the request record (no request id: no GET, no SET)',
    'no-rev-check': 'without the published-revision check (GET plans:{M}:rev)',
    'no-reply-json': 'without encoding the reply (cjson.encode)',
    'prelude-only': 'only the account prelude: replay check, account read, settle, save',
    'empty': 'an immediate return: EVALSHA with these keys and arguments',
}


def variant(name):
    pre, body = PRELUDE, DEBIT

    def cut(text, old, new=''):
        assert old in text, (name, old)
        return text.replace(old, new)

    for part in name.split('+'):
        if part in ('full', 'no-request-record'):
            pass
        elif part == 'no-ledger':
            body = cut(body, "entry('DEBIT', -AMOUNT, MSG, '')")
        elif part == 'no-debit-record':
            body = cut(body, "local existing = debit_view(D)", "local existing = nil")
            body = re.sub(r"redis\.call\('HSET', D,.*?'req', REQ\)", "", body, flags=re.S)
        elif part == 'no-rev-check':
            pre = cut(pre, "if (redis.call('GET', S) or '0') ~= (acct.erev or '') then return 'need' end", "")
        elif part == 'no-reply-json':
            pre = cut(pre, "local out = cjson.encode(reply)", "local out = 'ok'")
        elif part == 'prelude-only':
            body = "save() return 'ok'"
        elif part == 'empty':
            pre = "do return 'ok' end\n" + pre
        else:
            raise SystemExit(f'unknown variant {part!r}; known: {", ".join(VARIANTS)}')
    return pre + body


def free_port():
    s = socket.socket()
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start_redis(callgrind):
    port, d = free_port(), tempfile.mkdtemp()
    cmd = ['redis-server', '--port', str(port), '--dir', d, '--save', '', '--appendonly', 'no']
    out = os.path.join(d, 'callgrind.out')
    if callgrind:
        cmd = ['valgrind', '--tool=callgrind', f'--callgrind-out-file={out}'] + cmd
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    r = redis.Redis(port=port)
    for _ in range(300):
        try:
            r.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.1)
    return server, r, out


def debit_calls(r, text, n, tag):
    """Funds an account with the shipped script, then runs `text` n times."""
    now = int(time.time() * 1000)
    member = 'abl-' + tag
    ent = json.dumps({'rev': 1, 'periods': [{'v': 1, 'p': 'bench', 'm': 100000, 'c': 100000, 'paid': 1,
                                              'n': 1, 'st': now - 1000, 'cs': now - 1000,
                                              'ce': now + 86400000}]})
    with_request = 'no-request-record' not in tag

    def keys(i):
        return [f'billing:{{{member}}}:account', f'billing:{{{member}}}:ledger',
                f'billing:{{{member}}}:request:r{i}', f'billing:{{{member}}}:debit:m{i}',
                f'plans:{{{member}}}:rev']

    def args(i, entitlement):
        return [now, entitlement, now + 3600000, f'r{i}' if with_request else '', 'fp', 604800000,
                f'm{i}', 1, now + 30000]

    r.set(f'plans:{{{member}}}:rev', '1')
    first = r.eval(variant('full'), 5, *keys(-1), *args(-1, ent))
    assert b'"s":"ok"' in first, first
    sha = r.script_load(text)
    yield  # measuring starts here
    p = r.pipeline(transaction=False)
    for i in range(n):
        p.evalsha(sha, 5, *keys(i), *args(i, ''))
        if i % 50 == 49 or i == n - 1:
            out = p.execute()
            assert all(b'"need"' not in o and b'refused' not in o for o in out), out[:1]


def thin_calls(r, text, n, tag):
    sha = r.script_load(text)
    yield
    p = r.pipeline(transaction=False)
    for i in range(n):
        p.evalsha(sha, 2, f'thin:{{{tag}}}:bal', f'thin:{{{tag}}}:debits', f'm{i}', 1, 10**9)
        if i % 50 == 49 or i == n - 1:
            p.execute()


def measure(name, calls, n, callgrind):
    server, r, out = start_redis(callgrind)
    try:
        steps = calls(r, n, name.replace('+', '_'))
        next(steps)
        if callgrind:
            subprocess.run(['callgrind_control', '-z', str(server.pid)], stdout=subprocess.DEVNULL, check=True)
        else:
            r.config_resetstat()
        for _ in steps:
            pass
        if callgrind:
            subprocess.run(['callgrind_control', '-d', str(server.pid)], stdout=subprocess.DEVNULL, check=True)
            total = 0
            for f in glob.glob(out + '.*'):
                with open(f) as dump:
                    for line in dump:
                        if line.startswith('totals:'):
                            total = max(total, int(line.split()[1]))
            return total / n
        stats = r.info('commandstats')['cmdstat_evalsha']
        return stats['usec'] / stats['calls']
    finally:
        server.terminate()
        server.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('variants', nargs='*', default=list(VARIANTS))
    parser.add_argument('--time', action='store_true', help='Redis µs per call instead of instructions')
    parser.add_argument('--calls', type=int, default=1000)
    opts = parser.parse_args()
    unit = 'µs/call' if opts.time else 'instructions/call'
    rows = []
    for name in opts.variants:
        text = variant(name)
        rows.append((name, measure(name, lambda r, n, tag, t=text: debit_calls(r, t, n, tag),
                                   opts.calls, not opts.time)))
    if os.path.exists(THIN):
        with open(THIN) as f:
            thin = f.read()
        rows.append(('thin ideal', measure('thin', lambda r, n, tag: thin_calls(r, thin, n, tag),
                                           opts.calls, not opts.time)))
    full = dict(rows).get('full')
    print(f"{'variant':32} {unit:>18} {'vs full':>8}  what")
    for name, value in rows:
        ratio = f'{value / full:8.2f}' if full else ''
        what = ' + '.join(VARIANTS.get(p, '') for p in name.split('+')) if name != 'thin ideal' \
            else "../shared/bench/thin-ideal's debit.lua"
        print(f'{name:32} {value:18.0f} {ratio}  {what}')


if __name__ == '__main__':
    main()
