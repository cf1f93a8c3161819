import platform

import hyperframe.frame as hf

from reexec.daemon import tuning


def test_malloc_thresholds_are_raised_on_glibc() -> None:
    assert tuning.tune_malloc() is (platform.libc_ver()[0] == "glibc")


def test_data_frames_are_not_hex_dumped() -> None:
    tuning.quiet_frame_repr()
    frame = hf.DataFrame(1, data=b"\xff" * 100_000)
    text = repr(frame)
    assert "100000 bytes" in text and "ffff" not in text
