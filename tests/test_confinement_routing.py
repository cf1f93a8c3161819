"""One deployment for Bazel and BuildStream (README): workers offer their confinement mode,
BuildStream's actions get `confinement=input_root` from a property modifier, Bazel sends
`confinement=host`, and each reaches only the matching worker."""

from __future__ import annotations

import msgspec

from reexec.sandbox.action_confinement import own_platform
from reexec.sandbox.confine import ConfineMode
from reexec.sched.config import SchedulerConfig
from reexec.sched.matching import matches, queue_key, worker_properties

CONFIG = """
[[property_modifier]]
add = { name = "confinement", value = "input_root" }
"""


def test_bazel_and_buildstream_reach_their_workers() -> None:
    settings = msgspec.toml.decode(CONFIG, type=SchedulerConfig)
    workers = {
        mode: worker_properties(own_platform(mode).items())
        for mode in (ConfineMode.HOST, ConfineMode.INPUT_ROOT)
    }
    own = own_platform(ConfineMode.HOST)
    buildstream = [("OSFamily", own["OSFamily"]), ("ISA", own["ISA"]), ("unixUID", "0")]
    bazel = [("confinement", "host")]
    for props, want in ((buildstream, ConfineMode.INPUT_ROOT), (bazel, ConfineMode.HOST)):
        key = queue_key(props, settings.rules, settings.modifiers)
        reached = {m for m, offer in workers.items() if matches(key, offer, settings.rules)}
        assert reached == {want}, (props, key)
