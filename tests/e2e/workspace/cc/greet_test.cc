#include <iostream>

#include "cc/greet.h"

int main() {
  const std::string got = reexec_e2e::Greet("test");
  const std::string want = "hello-from-a, test";
  if (got != want) {
    std::cerr << "got '" << got << "', want '" << want << "'" << std::endl;
    return 1;
  }
  std::cout << "ok: " << got << std::endl;
  return 0;
}
