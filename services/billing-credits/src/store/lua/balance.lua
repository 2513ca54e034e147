-- GetBalance: settles the account (renewing when a new cycle began) and
-- answers the balance. Keys and arguments: account_args.lua.
-- Reply: {"s":"ok","balance":{...}}
save()
return finish({ s = 'ok', balance = balance_view() })
