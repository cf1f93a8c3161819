import sys

from reexec.daemon.cli import main

sys.exit(main())
