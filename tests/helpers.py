"""TEMPORARY re-export shim: the helpers live in tests/support/ now. Import from there; this file goes after merging."""

from tests.support.amqp import client_dead as client_dead
from tests.support.amqp import close_all as close_all
from tests.support.net import echo_handler as echo_handler
from tests.support.net import free_port as free_port
from tests.support.net import silent_backend as silent_backend
from tests.support.net import tcp_server as tcp_server
from tests.support.process import ProxyProcess as ProxyProcess
from tests.support.process import fd_targets as fd_targets
from tests.support.process import open_fds as open_fds
from tests.support.process import to_toml as to_toml
from tests.support.proxy import listen_addr as listen_addr
from tests.support.proxy import run_proxy as run_proxy
from tests.support.proxy import service_config as service_config
from tests.support.waiting import wait_for as wait_for
from tests.support.waiting import wait_for_sync as wait_for_sync
