import sys

from router.status.cli import main

sys.exit(main())
