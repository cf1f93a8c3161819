"""A confined action may run longer than 10 s.

bwrap's --die-with-parent follows the *thread* that forked bwrap. Forked from one of Trio's
cached worker threads (which exit after 10 s idle), every confined action was SIGKILLed at about
10 s and came back as exit code 137. `reexec/sandbox/spawner.py` forks from a long-lived thread.
"""

from __future__ import annotations

import trio

from tests.conftest import open_channel
from tests.e2e.harness import ReexecdProcess, free_port
from tests.fake_worker import ExecuteCall, execute_request, upload_action


async def test_a_confined_action_runs_past_ten_seconds(aio_loop, tmp_path):
    port = free_port()
    with ReexecdProcess(tmp_path / "data", port=port, log_dir=tmp_path / "log") as daemon:
        channel = await open_channel(port)
        try:
            digest = await upload_action(channel, ["sh", "-c", "sleep 11.5; echo still-here"])
            ex = ExecuteCall(channel, execute_request(digest))
            with trio.fail_after(60):
                await ex.run()
            response = ex.response
            assert response.status.code == 0, response
            assert response.result.exit_code == 0, daemon.log_text()[-2000:]
        finally:
            channel.close()
    assert "confinement" in daemon.log_text()  # the default (confined) worker ran it
