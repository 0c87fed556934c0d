"""Moving to rabbitproxy from another load balancer: ``rabbitproxy convert-haproxy`` (docs/migrating.md)."""
