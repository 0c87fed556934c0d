"""The admin API's handlers, one module per resource; ``rabbitproxy.admin.api`` routes to them."""
