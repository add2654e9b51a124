"""``kvsync serve``: the HTTP service around the index (SPEC section 5).

Modules: ``config`` (settings), ``command`` (the CLI's options), ``server``
(wiring and lifecycle), ``app`` (aiohttp application and middleware),
``mooncake`` and ``api`` (endpoints), ``metrics``, ``snapshots``,
``openapi`` (the API's description) and ``state`` (what they share).
"""
