"""Operational jobs launched from the UI: stop flows on purpose (``undeploy``), move a flow's consumer-group
offsets (``reset_offsets``)."""
