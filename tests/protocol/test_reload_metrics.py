"""``rabbitproxy_config_last_reload_successful`` and ``..._success_timestamp_seconds`` follow every reload's outcome,
and ``rabbitproxy_build_info`` names the running version (issue 27).

With ``workers = N`` a reload that some worker refused leaves that worker on the old configuration: a failure.
tests/integration/test_workers.py checks the same metrics through real worker processes.
"""

from __future__ import annotations

import platform
from typing import Any

import aiohttp
import pytest

from rabbitproxy import __version__
from rabbitproxy import config as config_mod
from rabbitproxy.config import ConfigError
from rabbitproxy.control.supervisor import Supervisor
from tests.support.metrics import metric
from tests.support.net import free_port
from tests.support.proxy import proxy_config, run_proxy, service_config

SUCCESSFUL = "rabbitproxy_config_last_reload_successful"
WHEN = "rabbitproxy_config_last_reload_success_timestamp_seconds"


class RefusingWorkers:
    """Stands in for the WorkerSet of a parent whose worker 1 refuses every configuration."""

    async def reload(self, config: config_mod.Config) -> list[str]:
        return ["worker 1: services['amqp'].listen: in use"]


def _service() -> dict[str, Any]:
    return service_config([{"name": "b1", "address": "127.0.0.1", "port": free_port()}], health_check={"type": "none"})


@pytest.mark.asyncio
async def test_the_reload_metrics_follow_each_outcome(monkeypatch: pytest.MonkeyPatch) -> None:
    admin = f"127.0.0.1:{free_port()}"
    good = config_mod.validate(proxy_config(_service(), admin={"listen": admin}), "test")
    async with run_proxy(_service(), admin={"listen": admin}) as proxy, aiohttp.ClientSession() as http:

        async def scrape() -> str:
            async with http.get(f"http://{admin}/metrics") as r:
                return await r.text()

        text = await scrape()
        assert metric(text, "rabbitproxy_build_info", version=__version__, python=platform.python_version()) == 1
        # No reload yet: the configuration loaded at the start counts, as of the start.
        assert metric(text, SUCCESSFUL) == 1
        started = metric(text, WHEN)
        assert started > 0

        with pytest.raises(ConfigError):
            await proxy.reload(good.model_copy(update={"workers": 2}))
        text = await scrape()
        assert metric(text, SUCCESSFUL) == 0
        assert metric(text, WHEN) == started

        await proxy.reload(good)
        text = await scrape()
        assert metric(text, SUCCESSFUL) == 1
        assert metric(text, WHEN) >= started

        await _refused_by_a_worker(proxy, good, monkeypatch)
        assert metric(await scrape(), SUCCESSFUL) == 0


async def _refused_by_a_worker(proxy: Supervisor, good: config_mod.Config, monkeypatch: pytest.MonkeyPatch) -> None:
    # Only for this reload: the proxy's shutdown must not find the stand-in.
    with monkeypatch.context() as m:
        m.setattr(proxy, "workers", RefusingWorkers())
        result = await proxy.reload(good)
    assert result.worker_errors
