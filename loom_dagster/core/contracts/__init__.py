"""Contracts between chained flows: the payload struct a flow writes to a topic against the struct every
flow reading that topic decodes it with.

``shape``: the typed description of a payload struct (``PayloadContract``), derived from the class.
``compare``: one writer struct against one reader struct (``Finding``s: breaking or compatible).
``chain``: the flows of a code location paired by topic; what a deploy checks (``ContractsReport``).

Only flows loaded in the same code location are seen: a reader in another code location is not.
"""
