import sys

from karmixlang.cli import main

sys.exit(main())
