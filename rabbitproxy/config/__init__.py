"""Configuration: frozen, validated data and nothing else.

Phase one of the two-phase config (uvicorn's ``Config`` / ``Config.load()``): this package turns a TOML file, or
the handful of values a command line gives, into immutable pydantic models. Sockets, tasks and SSL contexts are
built from these models later, by the server. Every error names the key path that is wrong and why, so an
operator can fix the file without reading our code.

The package is split by job (models by section in ``base``, ``sections``, ``rabbitmq`` and ``service``; reading and
validating in ``loading``, ``errors`` and ``checks``; the files a configuration names in ``files``); every public
name is exported here, and callers import it from ``rabbitproxy.config``.
"""

from __future__ import annotations

# The host:port helpers live in the stdlib-only addresses module; callers have always found them here too.
from rabbitproxy.addresses import DEFAULT_ADMIN_LISTEN as DEFAULT_ADMIN_LISTEN
from rabbitproxy.addresses import DEFAULT_PORT as DEFAULT_PORT
from rabbitproxy.addresses import format_host_port as format_host_port
from rabbitproxy.addresses import split_host_port as split_host_port
from rabbitproxy.config.base import ConfigError as ConfigError
from rabbitproxy.config.base import Port as Port
from rabbitproxy.config.base import PositiveSeconds as PositiveSeconds
from rabbitproxy.config.base import ProxyProtocolVersion as ProxyProtocolVersion
from rabbitproxy.config.base import Seconds as Seconds
from rabbitproxy.config.base import TLSVersion as TLSVersion
from rabbitproxy.config.base import WholeSeconds as WholeSeconds
from rabbitproxy.config.base import check_host as check_host
from rabbitproxy.config.checks import READ_TOKEN_ENV as READ_TOKEN_ENV
from rabbitproxy.config.checks import TOKEN_ENV as TOKEN_ENV
from rabbitproxy.config.checks import admin_token_error as admin_token_error
from rabbitproxy.config.checks import is_loopback as is_loopback
from rabbitproxy.config.checks import warnings as warnings
from rabbitproxy.config.loading import from_env as from_env
from rabbitproxy.config.loading import load as load
from rabbitproxy.config.loading import load_admin as load_admin
from rabbitproxy.config.loading import parse_backend_spec as parse_backend_spec
from rabbitproxy.config.loading import read_toml as read_toml
from rabbitproxy.config.loading import validate as validate
from rabbitproxy.config.loading import with_overrides as with_overrides
from rabbitproxy.config.rabbitmq import RabbitMQConfig as RabbitMQConfig
from rabbitproxy.config.rabbitmq import RebalanceConfig as RebalanceConfig
from rabbitproxy.config.sections import AdminConfig as AdminConfig
from rabbitproxy.config.sections import FeedbackConfig as FeedbackConfig
from rabbitproxy.config.sections import HealthCheckConfig as HealthCheckConfig
from rabbitproxy.config.sections import LogConfig as LogConfig
from rabbitproxy.config.sections import TLSConfig as TLSConfig
from rabbitproxy.config.service import SOURCE_CLIENT as SOURCE_CLIENT
from rabbitproxy.config.service import Algorithm as Algorithm
from rabbitproxy.config.service import BackendConfig as BackendConfig
from rabbitproxy.config.service import Config as Config
from rabbitproxy.config.service import KeepaliveConfig as KeepaliveConfig
from rabbitproxy.config.service import ServiceConfig as ServiceConfig
