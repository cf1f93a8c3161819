from reexec.gen.build.bazel.remote.execution import v2 as re
from tests.conftest import call


async def test_capabilities(channel):
    stub = re.CapabilitiesStub(channel)
    caps = await call(stub.get_capabilities, re.GetCapabilitiesRequest())
    assert caps.low_api_version.major == 2 and caps.low_api_version.minor == 0
    assert caps.execution_capabilities.digest_function == re.DigestFunctionValue.SHA256
