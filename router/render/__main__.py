import sys

from router.render.cli import main

sys.exit(main())
