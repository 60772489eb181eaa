import sys

from smartkv.cli import main

sys.exit(main())
