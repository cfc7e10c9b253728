"""Everything that runs on Ray: the runtime (start or join a cluster), the Ray Train driver (``train``) and the
loop each worker runs (``worker``), and the Ray Data actors that judge an eval set (``judge``). The reward server,
on Ray Serve, lives in ``tasks.serving``."""
