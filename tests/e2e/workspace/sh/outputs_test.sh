#!/bin/bash
# Runs from the runfiles tree of the main repository.
set -euo pipefail

fail() {
  echo "FAIL: $*" >&2
  exit 1
}

expect() {
  local file=$1 want=$2
  local got
  got=$(cat "$file")
  [[ "$got" == "$want" ]] || fail "$file: got '$got', want '$want'"
}

expect gen/b.txt $'hello-from-a\nHELLO-FROM-B'
expect gen/sub/dir/x.txt $'x:hello-from-a\nx:HELLO-FROM-B'
expect gen/sub/y.txt 'y'
expect tree/listing.txt $'./bin/tool.sh\n./empty.txt\n./nested/deeper/three.txt\n./nested/two.txt\n./one.txt\none\ntwo\nthree\ntree-tool-ran'
expect tree/expanded.txt $'bin/tool.sh: #!/bin/sh\nempty.txt: \nnested/deeper/three.txt: three\nnested/two.txt: two\none.txt: one'
[[ "$(cc/hello runfiles)" == "hello-from-a, runfiles" ]] || fail "cc/hello printed '$(cc/hello runfiles)'"
echo "all outputs as expected"
