"""Helpers shared by the tests, one copy of each, in modules named by their job.

- ``waiting``: ``wait_for`` / ``wait_for_sync``, polling with a deadline (never a bare sleep).
- ``net``: free ports, small TCP servers (echo, unanswered SYNs).
- ``proxy``: proxy config builders, ``run_proxy`` (serve() in this loop), ``listen_addr``, ``make_service``.
- ``process``: ``rabbitproxy serve`` as a subprocess, TOML writing, descriptor counts.
- ``fakes``: fake connections, transports and services for driving the legs and the pool without sockets.
- ``metrics``: one Prometheus text parser.
- ``tls``: a throwaway CA and certificates made with openssl.
- ``cluster``: backend config entries for the session's RabbitMQ cluster.
- ``amqp``: aio-pika client state.

Fixtures stay in conftest files; tests import helpers from here, never from a conftest.
"""
