#pragma once

#include <string>

namespace reexec_e2e {

// Returns the greeting baked into the generated header, followed by `name`.
std::string Greet(const std::string& name);

}  // namespace reexec_e2e
