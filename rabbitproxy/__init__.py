"""rabbitproxy: a layer-7 load balancer for RabbitMQ clusters."""

__version__ = "0.1.0"
