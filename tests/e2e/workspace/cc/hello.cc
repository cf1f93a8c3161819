#include <iostream>

#include "cc/greet.h"

int main(int argc, char** argv) {
  std::cout << reexec_e2e::Greet(argc > 1 ? argv[1] : "world") << std::endl;
  return 0;
}
