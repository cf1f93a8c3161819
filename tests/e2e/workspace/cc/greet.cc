#include "cc/greet.h"

#include "cc/generated.h"

namespace reexec_e2e {

std::string Greet(const std::string& name) { return std::string(REEXEC_GREETING) + ", " + name; }

}  // namespace reexec_e2e
