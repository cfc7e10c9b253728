"""The reward server and its clients: ``server`` (Ray Serve deployment and ``gram serve``), ``api`` (request and
response shapes, no Ray), ``reward_functions`` (TRL, OpenRLHF and verl adapters) and ``reward_client`` (a thin
HTTP client that imports no torch)."""
