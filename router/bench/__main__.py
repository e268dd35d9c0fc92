import sys

from router.bench.cli import main

sys.exit(main())
